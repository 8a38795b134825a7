"""Triton kernels of rlcore, imported as ``rlcore.kernels`` (``rlcore/kernels`` is a symlink to this folder).

This folder is never a top-level package: ``kernels`` is the name of Hugging Face's kernel hub.
Importing it needs triton; kernels are compiled lazily on first launch. Set ``TRITON_INTERPRET=1`` before the first
import to run them on CPU tensors in Triton's interpreter.
"""

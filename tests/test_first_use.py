"""What a new user meets first: typed configs with one clear message, safe resume, a run that stops when it learns
nothing, strict-JSON metrics, the command's help, the group-advantage helper, and the files a checkout must hold.

The trainer's runs are a tiny random Llama for a step or two (seconds); nothing here downloads anything.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcore

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------------------
# rlcore.group_advantages
# ----------------------------------------------------------------------------------------------------------------------


def _advantages_reference(rewards, g, normalize, leave_one_out, eps=1e-6):
    """Sample by sample in float64 Python: the baseline, then the division by the group's population std."""
    out = []
    for p in range(len(rewards) // g):
        group = [float(x) for x in rewards[p * g:(p + 1) * g]]
        mean = sum(group) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / g)
        for i, x in enumerate(group):
            base = (sum(group) - x) / (g - 1) if leave_one_out else mean
            a = x - base
            out.append(a / (std + eps) if normalize else a)
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(g=st.integers(1, 7), p=st.integers(1, 5), normalize=st.booleans(), loo=st.booleans(),
       data=st.data())
def test_group_advantages_against_a_float64_loop(g, p, normalize, loo, data):
    if loo and g == 1:
        g = 2
    values = data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]) | st.floats(-1e3, 1e3), min_size=g * p,
                                max_size=g * p))
    r = torch.tensor(values, dtype=torch.float64)
    got = rlcore.group_advantages(r, g, normalize=normalize, leave_one_out=loo)
    want = _advantages_reference(values, g, normalize, loo)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the [P, G] layout gives the same numbers in that shape
    torch.testing.assert_close(rlcore.group_advantages(r.view(p, g), normalize=normalize, leave_one_out=loo),
                               want.view(p, g), rtol=1e-9, atol=1e-9)


def test_group_advantages_edge_cases():
    flat = rlcore.group_advantages(torch.ones(8), 4)                       # nothing to learn: zeros, not NaN
    assert torch.equal(flat, torch.zeros(8))
    ints = rlcore.group_advantages(torch.tensor([1, 0, 0, 0]), 4, normalize=False)
    assert ints.dtype == torch.float32 and torch.allclose(ints, torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(rlcore.group_advantages(torch.tensor([1.0, 0.0]), 2, normalize=False, leave_one_out=True),
                          torch.tensor([1.0, -1.0]))
    nan = rlcore.group_advantages(torch.tensor([1.0, float("nan"), 1.0, 0.0]), 2)
    assert nan[:2].isnan().all() and torch.isfinite(nan[2:]).all()      # a broken reward stays visible
    bf16 = rlcore.group_advantages(torch.tensor([1.0, 0.0], dtype=torch.bfloat16), 2)
    assert bf16.dtype == torch.bfloat16


@pytest.mark.parametrize("args, kw, err, match", [
    ((torch.ones(6), 4), {}, ValueError, r"rewards must be \[B\] with B a multiple of group_size = 4, got shape"),
    ((torch.ones(6), 0), {}, ValueError, "group_size must be a positive int, got 0"),
    ((torch.ones(6), True), {}, ValueError, "group_size must be a positive int, got True"),
    ((torch.ones(6),), {}, ValueError, r"rewards must be \[P, G\] when group_size is None"),
    ((torch.ones(3, 1),), dict(leave_one_out=True), ValueError, "leave_one_out needs at least 2 samples"),
    (([1.0, 0.0], 2), {}, TypeError, "rewards must be a torch.Tensor, got list"),
    ((torch.ones(4), 2), dict(eps=-1.0), ValueError, "eps must be a number >= 0"),
])
def test_group_advantages_bad_input(args, kw, err, match):
    with pytest.raises(err, match=match):
        rlcore.group_advantages(*args, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# typed configs
# ----------------------------------------------------------------------------------------------------------------------

pytest.importorskip("pydantic")
yaml = pytest.importorskip("yaml")
from rlcore.trainer.config import ConfigError, TrainConfig, load_config  # noqa: E402


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_are_parsed_to_their_declared_types(tmp_path):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string and ``"no"`` quoted stays a string: both become what the field
    declares."""
    cfg = load_config(_yaml(tmp_path, 'lr: 1e-3\nbeta: 1e-3\nresume: "no"\nplot: off\ncpu_threads: 2\n'
                                      'steps: "40"\ntemperature: 1\n'))
    assert (cfg.lr, cfg.beta, cfg.resume, cfg.plot, cfg.cpu_threads, cfg.steps) == (1e-3, 1e-3, False, False, 2, 40)
    assert type(cfg.lr) is float and type(cfg.steps) is int and type(cfg.temperature) is float
    assert cfg.learning_rate == 1e-3


@pytest.mark.parametrize("text, field, shown, accepted", [
    ("lr: .inf", "lr", "inf", "a finite number > 0, or null"),
    ("lr: -1e-3", "lr", "-1e-3", "> 0"),
    ("beta: -1.0e-3", "beta", "-0.001", "a finite number >= 0"),
    ("entropy_coef: .nan", "entropy_coef", "nan", "a finite number"),
    ("eps_low: -0.5", "eps_low", "-0.5", ">= 0 and < 1"),
    ("head_precision: fp64", "head_precision", "'fp64'", "one of 'default', 'tf32', 'fp32'"),
    ("weight_decay: -1", "weight_decay", "-1", ">= 0"),
    ("cpu_threads: 0", "cpu_threads", "0", "an integer >= 1, or null"),
    ("steps: 1.5", "steps", "1.5", "an integer >= 1"),
    ("steps: true", "steps", "True", "an integer >= 1"),
    ("resume: maybe", "resume", "'maybe'", "true or false"),
    ("algo: ppo2", "algo", "'ppo2'", "one of 'grpo', 'dapo'"),
    ("dtype: fp16", "dtype", "'fp16'", "one of 'float32', 'bfloat16', 'float16'"),
    ("model_hidden: 60\nmodel_heads: 7", "model_hidden", "60", "a multiple of model_heads = 7"),
    ("temperature: 0", "temperature", "0", "> 0"),
    ("out: [a, b]", "out", "['a', 'b']", "a string"),
])
def test_bad_values_are_refused_with_field_value_and_what_is_accepted(tmp_path, text, field, shown, accepted):
    """Each fails while the config is read (nothing is built), with one message: the field as written, the value
    as written, what the field accepts."""
    with pytest.raises(ConfigError) as info:
        load_config(_yaml(tmp_path, text + "\n"))
    err = info.value
    assert err.field == field
    message = str(err)
    assert message.startswith(f"{field} must be ") and f"got {shown}" in message and accepted in message, message
    assert "\n" not in message


def test_broken_yaml_and_json_name_the_file_and_the_place(tmp_path):
    path = _yaml(tmp_path, "algo: gspo\nsteps: [1, 2\n")
    with pytest.raises(ValueError, match=r"config '.*run.yaml' is not valid YAML at line \d+, column \d+") as info:
        load_config(path)
    assert not isinstance(info.value, yaml.YAMLError)
    bad = tmp_path / "run.json"
    bad.write_text('{"algo": "gspo",}')
    with pytest.raises(ValueError, match=r"config '.*run.json' is not valid JSON at line 1, column \d+"):
        load_config(str(bad))
    with pytest.raises(ValueError, match=r"config '.*nope.yaml' cannot be read"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="must hold a mapping of field names to values, got a list"):
        load_config(_yaml(tmp_path, "- algo\n- gspo\n"))
    with pytest.raises(ValueError, match=r"unknown config field\(s\) 'learning_rate' \(did you mean 'sft_lr'\?\)|"
                                         r"unknown config field\(s\) 'learning_rate'"):
        load_config(_yaml(tmp_path, "learning_rate: 1e-3\n"))


def test_quick_keeps_the_fields_the_user_set():
    cfg = TrainConfig(quick=True, steps=7)
    assert cfg.steps == 7 and cfg.eval_every == 20
    assert TrainConfig(quick=True).steps == 120


def test_mutated_configs_are_checked_again():
    cfg = TrainConfig()
    cfg.lr = "2e-4"
    cfg.validate()
    assert cfg.lr == 2e-4
    cfg.grad_clip = float("nan")
    with pytest.raises(ConfigError, match="grad_clip must be a finite number > 0, got nan"):
        cfg.validate()


# ----------------------------------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------------------------------


def test_cli_names_the_flag_or_the_file_field(tmp_path, capsys):
    from rlcore.cli import main

    assert main(["train", "--lr", "inf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlcore train: bad config: --lr must be a finite number > 0") and "Traceback" not in err
    assert main(["train", "--config", _yaml(tmp_path, "lr: .inf\n")]) == 2
    assert "bad config: lr must be a finite number > 0" in capsys.readouterr().err
    assert main(["train", "--config", _yaml(tmp_path, "algo: [gspo\n")]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err


def test_cli_help_describes_every_flag_with_its_choices():
    from rlcore.cli import _parser

    parser = _parser()
    top = parser.format_help()
    assert "``" not in top and "train" in top
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.dest in ("help",):
            continue
        assert action.help and not action.help.startswith("(default"), action.dest
        if action.choices:
            assert all(c in train.format_help() for c in action.choices)
    text = re.sub(r"\s+", " ", train.format_help())
    assert "--head-precision {default,tf32,fp32}" in text and "--algo {grpo,dapo,dr_grpo" in text
    assert "--no-resume" in text and "``" not in text


# ----------------------------------------------------------------------------------------------------------------------
# runs: resume, skipped updates, metrics
# ----------------------------------------------------------------------------------------------------------------------


def _tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / "run"), sft_steps=0, steps=1, prompts_per_step=2, train_prompts=16,
                eval_prompts=4, eval_every=1, save_every=1, plot=False, progress=False, engine="transformers",
                group_size=2)
    base.update(kw)
    return TrainConfig(**base)


def nan_reward(prompt: str, completion: str) -> float:
    return float("nan")


@pytest.fixture
def trained(tmp_path):
    """A run of one step with its checkpoint."""
    pytest.importorskip("transformers")
    from rlcore.trainer import train

    train(_tiny(tmp_path, algo="gspo"))
    return tmp_path


def test_resume_with_other_settings_refuses_naming_the_fields(trained, monkeypatch):
    from rlcore.trainer import RunError, Trainer
    from rlcore.trainer import loop

    monkeypatch.setattr(loop, "build_model", lambda *a, **k: pytest.fail("refused after building the model"))
    with pytest.raises(RunError) as info:
        Trainer(_tiny(trained, algo="rebel", model_hidden=128, steps=3))
    message = str(info.value)
    assert "checkpoint.pt was made with other settings" in message
    assert "algo: 'gspo' in the checkpoint, 'rebel' now" in message
    assert "model_hidden: 64 in the checkpoint, 128 now" in message and "steps" not in message.split("(")[1]
    assert "--force-resume" in message and "--no-resume" in message


def test_force_resume_and_bookkeeping_changes_continue(trained, capsys):
    from rlcore.trainer import train

    history = train(_tiny(trained, algo="gspo", steps=2, log_every=5, save_every=5))    # bookkeeping may change
    assert [r["step"] for r in history] == [0, 1, 2]
    history = train(_tiny(trained, algo="gspo", steps=3, entropy_coef=0.01, force_resume=True))
    assert [r["step"] for r in history] == [0, 1, 2, 3]
    assert "[resume] from" in capsys.readouterr().err


def test_steps_at_or_below_the_checkpoint(trained, capsys):
    from rlcore.trainer import RunError, train

    train(_tiny(trained, algo="gspo", steps=2))
    with pytest.raises(RunError, match=r"checkpoint .*checkpoint.pt is at step 2, past steps=1: there is nothing "
                                       "to train"):
        train(_tiny(trained, algo="gspo", steps=1))
    capsys.readouterr()
    assert [r["step"] for r in train(_tiny(trained, algo="gspo", steps=2))] == [0, 1, 2]
    assert "nothing left to train" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_checkpoint_names_the_file(trained, damage):
    from rlcore.trainer import RunError, Trainer

    path = trained / "run" / "checkpoint.pt"
    whole = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": whole[:len(whole) // 2], "garbage": b"not a checkpoint"}[damage])
    with pytest.raises(RunError, match=re.escape(str(path)) + " cannot be read .*--no-resume"):
        Trainer(_tiny(trained, algo="gspo", steps=3))
    torch.save({"weights": torch.ones(1)}, path)                       # readable, but not the trainer's
    with pytest.raises(RunError, match=re.escape(str(path)) + r" is not an rlcore.trainer checkpoint \(no step"):
        Trainer(_tiny(trained, algo="gspo", steps=3))


def test_a_run_whose_updates_keep_being_skipped_stops_and_says_why(tmp_path, capsys):
    """A NaN reward: every update is skipped; after max_skipped steps the command exits 1 with the reason, and
    metrics.jsonl is strict JSON (null where the loss was NaN)."""
    pytest.importorskip("transformers")
    from rlcore.cli import main

    out = tmp_path / "nan"
    code = main(["train", "--out", str(out), "--sft-steps", "0", "--steps", "10", "--max-skipped", "2",
                 "--prompts-per-step", "2", "--group-size", "2", "--train-prompts", "16", "--eval-prompts", "4",
                 "--no-plot", "--no-progress", "--engine", "transformers",
                 "--reward", "tests.test_first_use:nan_reward"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"rlcore train: the last 2 steps \(up to step 2\) skipped every update: the loss or the "
                     r"gradient norm was not finite; the reward function returned nan for 4 of 4 samples", err), err

    def strict(token):
        raise ValueError(f"not strict JSON: {token}")

    records = [json.loads(line, parse_constant=strict) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["loss"] is None and records[1]["reward"] is None and records[1]["skipped"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# the checkout
# ----------------------------------------------------------------------------------------------------------------------


def test_the_license_setup_py_declares_is_there():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Apache Software License" in (ROOT / "setup.py").read_text()


def test_run_and_bench_outputs_are_ignored():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/runs/" in ignored and "/bench/runs/" in ignored


def test_docs_point_at_files_that_exist():
    """Every ``docs/...`` or ``*.md`` path the README names is in the checkout, and nothing points at the design
    notes' LOSSES.md, which is not shipped."""
    readme = (ROOT / "README.md").read_text()
    assert "LOSSES.md" not in readme
    for path in set(re.findall(r"`((?:docs|bench|csrc|rlcore|kernels|tests)/[\w./-]+\.(?:md|png|py))`", readme)):
        if "<" not in path:
            assert (ROOT / path).exists(), path
    validate = (ROOT / "rlcore" / "validate.py").read_text()
    for anchor in re.findall(r"README\.md#([\w-]+)", validate):
        headings = {re.sub(r"[^\w -]", "", h).strip().lower().replace(" ", "-")
                    for h in re.findall(r"^#+ (.+)$|^\*\*(.+?)\.\*\*", readme, re.M) for h in h if h}
        assert anchor in headings, anchor


def test_bench_writes_outside_the_tracked_results_by_default():
    from bench.cli import default_out

    out = default_out("cpu-some-slug")
    assert (ROOT / "bench" / "results") not in out.parents
    if (ROOT / ".git").exists():
        import subprocess

        probe = out / "20260101-000000.json"
        proc = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT)
        assert proc.returncode == 0, f"{probe} is not ignored by git"
        proc = subprocess.run(["git", "check-ignore", "-q", str(ROOT / "runs" / "gspo" / "metrics.jsonl")], cwd=ROOT)
        assert proc.returncode == 0, "runs/ is not ignored by git"


def test_bench_quick_on_cpu_stays_small():
    """--quick on CPU: every case at N = 1024 on cpu-small, no torch.compile (its minutes of compiling), so the
    largest materialised [N, V] logits stay far from the 5 GB of N = 8192 (the full run keeps it)."""
    from bench.cases import CASES
    from bench.runner import Config, plan
    from bench.shapes import default_shapes

    def groups(quick):
        cfg = Config(device=torch.device("cpu"), quick=quick, cases=tuple(CASES),
                     shapes=default_shapes("cpu", quick), dtypes=("fp32",), providers=())
        return plan(cfg)

    quick = groups(True)
    assert quick and {n for *_, n in quick} == {1024} and {s for _, s, _, _ in quick} == {"cpu-small"}
    assert 8192 in {n for *_, n in groups(False)}


def test_validate_points_at_an_explanation_of_the_bar(capsys):
    """The table's header sends the reader to `-h` and the README; both explain the bar with its numbers."""
    import rlcore.validate as validate

    with pytest.raises(SystemExit):
        validate.main(["-h"])
    text = capsys.readouterr().out
    assert "``" not in text
    assert "FP32_TOL (relative): logp 2e-05" in text and "no worse than PyTorch's own computation" in text
    assert "err/bar column is the worst error as a fraction of its bar" in text
    readme = (ROOT / "README.md").read_text()
    assert "## Precision" in readme and "**Accuracy bar.**" in readme
    assert "README.md#precision" in (ROOT / "rlcore" / "validate.py").read_text()


def test_the_vocabulary_parallel_readme_example_runs_as_written(tmp_path):
    """The README's tensor-parallel example, cut out of the README as is, under torchrun with two gloo ranks."""
    import os
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    (code,) = [b for b in blocks if "process_group=tp_group" in b and "init_process_group" in b]
    script = tmp_path / "tp_example.py"
    script.write_text(code + "\nprint('rank', r, 'loss', float(out.loss), 'grad', float(w_shard.grad.abs().sum()))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = {line.split()[3] for line in proc.stdout.splitlines() if line.startswith("rank ")}
    assert len(losses) == 1 and math.isfinite(float(losses.pop()))       # both ranks, the same loss


def test_rlcore_imports_without_the_trainers_extras():
    """No pydantic, transformers or yaml: `import rlcore` works, and the trainer's config says what to install."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('pydantic', 'transformers', 'yaml'):\n"
            "    sys.modules[name] = None\n"
            "import rlcore, torch\n"
            "assert rlcore.group_advantages(torch.tensor([1.0, 0.0]), 2).shape == (2,)\n"
            "from rlcore.trainer.config import TrainConfig\n"
            "try:\n"
            "    TrainConfig()\n"
            "except ImportError as e:\n"
            "    print('ImportError:', e)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError: the trainer's config needs pydantic>=2: pip install 'rlcore[hf]'" in proc.stdout

"""examples/deepseek-tiny: the model routes and attends as DeepSeek's does, training lowers the
loss, resumes exactly, stops cleanly on SIGTERM, evaluates a checkpoint through the SDK, runs
under torchrun, and its pipeline file validates.

Each test trains a few steps at most (each well under 20 s on 2 cores; the subprocess ones are
marked slow). Skipped where torch is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ciuic_common.globs import matches_any
from ciuic_common.pipeline import ValuesParameter, load_pipeline

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    torch = pytest.importorskip(
        "torch", reason="examples/deepseek-tiny needs torch (pip install torch==2.13.0)"
    )

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepseek-tiny"
sys.path.insert(0, str(EXAMPLE))

import checkpoints  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from model import DeepSeekTiny, ModelConfig, route_bias_step  # noqa: E402

#: A few steps, no evaluation or checkpoint unless a test asks: fast and deterministic.
FAST = {
    "batch_size": 4,
    "seq_len": 32,
    "log_every": 1,
    "eval_every": 1000,
    "eval_tokens": 1024,
    "checkpoint_every": 1000,
    "num_threads": 1,
}


def settings(**values: Any) -> train.Settings:
    return train.load_settings({**FAST, **values})


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIUIC_")}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


class MetricsSocket:
    """A real Unix socket standing in for the agent's end of the SDK's channel."""

    def __init__(self, directory: str) -> None:
        self.path = str(Path(directory) / "m.sock")
        self.lines: list[dict[str, Any]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            connection, _ = self._server.accept()
            with connection, connection.makefile("r") as stream:
                self.lines.extend(json.loads(line) for line in stream)

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._server.close()


@pytest.fixture
def metrics_socket() -> Iterator[MetricsSocket]:
    # A short directory: Unix socket paths are limited to ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="dst-") as directory:
        server = MetricsSocket(directory)
        yield server
        server.close()


# --- the model -------------------------------------------------------------------------------
def test_forward_gives_next_token_logits_for_every_position() -> None:
    torch.manual_seed(0)
    model = DeepSeekTiny(ModelConfig(vocab_size=97))  # a size no other weight has
    tokens = torch.randint(0, 97, (3, 20))

    logits = model(tokens)

    assert logits.shape == (3, 20, 97)
    assert torch.isfinite(logits).all()
    # Tied embeddings: the embedding matrix is the only vocabulary-sized weight.
    vocab_sized = [n for n, p in model.named_parameters() if 97 in p.shape]
    assert vocab_sized == ["embed.weight"]


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = DeepSeekTiny(ModelConfig()).eval()
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 256

    with torch.no_grad():
        before, after = model(tokens), model(changed)

    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_keys_and_values_come_from_a_low_rank_latent() -> None:
    cfg = ModelConfig()
    attention = DeepSeekTiny(cfg).blocks[0].attn

    assert attention.kv_down.out_features == cfg.kv_latent_dim + cfg.rope_dim
    assert attention.kv_up.in_features == cfg.kv_latent_dim
    # Per token a cache would hold the latent and one rotary key, not every head's k and v.
    assert cfg.kv_latent_dim + cfg.rope_dim < 2 * cfg.n_heads * cfg.head_dim


def test_moe_sends_each_token_to_top_k_routed_experts_and_always_to_the_shared_one() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = DeepSeekTiny(cfg)
    moe = model.moe_layers[0]
    seen: dict[str, int] = {}

    def counter(name: str) -> Any:
        def hook(module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            seen[name] = seen.get(name, 0) + inputs[0].shape[0]

        return hook

    assert moe.shared is not None
    moe.shared.register_forward_hook(counter("shared"))
    for index, expert in enumerate(moe.experts):
        expert.register_forward_hook(counter(f"expert{index}"))
    tokens = torch.randint(0, 256, (2, 24))

    model(tokens)

    count = tokens.numel()
    assert seen["shared"] == count
    assert sum(seen[f"expert{i}"] for i in range(cfg.n_routed_experts)) == count * cfg.top_k
    choice = moe.last_choice
    assert choice.shape == (count, cfg.top_k)
    assert all(len(set(row.tolist())) == cfg.top_k for row in choice)
    assert int(moe.load.sum()) == count * cfg.top_k


def test_routing_bias_chooses_experts_and_moves_towards_an_even_load() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(top_k=1)
    model = DeepSeekTiny(cfg)
    moe = model.moe_layers[0]
    moe.route_bias[:] = torch.tensor([0.0, 0.0, 100.0, 0.0])

    model(torch.randint(0, 256, (2, 16)))
    assert moe.load.tolist() == [0, 0, 32, 0]

    route_bias_step(model)
    rate = cfg.route_bias_rate
    assert moe.route_bias.tolist() == pytest.approx([rate, rate, 100.0 - rate, rate])


def test_model_config_refuses_top_k_above_the_experts() -> None:
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(top_k=5, n_routed_experts=4)


# --- training --------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss(tmp_path: Path) -> None:
    result = train.train(settings(steps=15, learning_rate=0.01), tmp_path)

    losses = [point["training_loss"] for point in result.history if "training_loss" in point]
    assert result.step == 15
    assert result.exit_code == 0
    assert losses[0] > 5.0  # about ln(256): nothing learned yet
    assert losses[-1] < losses[0] - 1.5


def test_training_writes_checkpoints_and_a_summary(tmp_path: Path) -> None:
    result = train.train(
        settings(steps=4, checkpoint_every=2, eval_every=4, keep_checkpoints=0), tmp_path
    )

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-0000002.pt", "step-0000004.pt"]
    state = checkpoints.load(tmp_path / "checkpoints" / "step-0000004.pt")
    assert state["step"] == 4
    assert {"model", "optimizer", "rng", "model_config", "train_config"} <= set(state)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 4
    assert {"training_loss", "validation_loss", "accuracy", "tokens_per_s"} <= set(summary)
    assert result.checkpoint == tmp_path / "checkpoints" / "step-0000004.pt"


def test_resumed_training_continues_at_the_same_step_with_identical_losses(
    tmp_path: Path,
) -> None:
    config = settings(steps=6, checkpoint_every=3, keep_checkpoints=0)
    straight = train.train(config, tmp_path / "straight")
    init = tmp_path / "init"
    init.mkdir()
    shutil.copy(tmp_path / "straight" / "checkpoints" / "step-0000003.pt", init)

    resumed = train.train(config, tmp_path / "resumed", init_checkpoint=init)

    def losses(result: train.TrainResult) -> dict[int, float]:
        return {int(p["step"]): p["training_loss"] for p in result.history if "training_loss" in p}

    assert sorted(losses(resumed)) == [4, 5, 6]
    assert losses(resumed) == {step: losses(straight)[step] for step in (4, 5, 6)}


def test_resume_refuses_a_checkpoint_of_another_shape(tmp_path: Path) -> None:
    train.train(settings(steps=1), tmp_path / "first")

    with pytest.raises(ValueError, match="d_model=128"):
        train.train(
            settings(steps=2, d_model=64),
            tmp_path / "second",
            init_checkpoint=tmp_path / "first" / "checkpoints",
        )


def test_hyperparameters_come_from_ciuic_hparams_then_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({"learning_rate": 0.01, "batch_size": 8, "steps": 40}))
    monkeypatch.setenv("CIUIC_HPARAMS", str(hparams))

    values = train._values(train._parse(["--steps", "3", "--set", "top_k=1"]))
    loaded = train.load_settings(values)

    assert loaded.train.learning_rate == 0.01
    assert loaded.train.batch_size == 8
    assert loaded.train.steps == 3
    assert loaded.model.top_k == 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rat": 0.1}, "unknown hyperparameter"),
        ({"batch_size": 8.5}, "not a valid int"),
        ({"batch_size": True}, "not a valid int"),
    ],
)
def test_bad_hyperparameters_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train.load_settings(values)


def test_learning_rate_warms_up_then_decays() -> None:
    config = train.TrainConfig(learning_rate=0.01, steps=100, warmup_steps=10)

    rates = [train.learning_rate_at(step, config) for step in range(100)]

    assert rates[0] == pytest.approx(0.001)
    assert max(rates) == pytest.approx(0.01)
    assert rates[-1] == pytest.approx(0.001, rel=0.05)


# --- stopping, evaluating, launching ---------------------------------------------------------
@pytest.mark.slow
def test_sigterm_during_training_leaves_a_checkpoint(tmp_path: Path) -> None:
    hparams = tmp_path / "hparams.json"
    hparams.write_text(json.dumps({**FAST, "steps": 100_000}))
    process = subprocess.Popen(
        [sys.executable, "train.py"],
        cwd=EXAMPLE,
        env=script_env(CIUIC_HPARAMS=str(hparams), CIUIC_OUTPUT_DIR=str(tmp_path / "out")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        for line in process.stdout:
            if line.startswith("step      3 "):
                break
            assert time.monotonic() < deadline, "training did not reach step 3"
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 128 + signal.SIGTERM, rest
    assert "stopped by signal" in rest
    assert "Traceback" not in rest
    path = checkpoints.find(tmp_path / "out" / "checkpoints")
    assert path is not None
    assert checkpoints.load(path)["step"] >= 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["exit_code"] == 143


@pytest.mark.slow
def test_evaluate_logs_the_metrics_of_the_checkpoint_through_the_sdk(
    tmp_path: Path, metrics_socket: MetricsSocket
) -> None:
    train.train(settings(steps=3), tmp_path / "trial")

    done = subprocess.run(
        [sys.executable, "evaluate.py", "--dataset", "small-test-set", "--split", "small"],
        cwd=EXAMPLE,
        env=script_env(
            CIUIC_INIT_CHECKPOINT=str(tmp_path / "trial" / "checkpoints"),
            CIUIC_OUTPUT_DIR=str(tmp_path / "eval"),
            CIUIC_METRICS_SOCKET=metrics_socket.path,
        ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "CIUIC_DATA_SMALL_TEST_SET is not set" in done.stderr
    metrics_socket.close()
    logged = {line["key"]: line for line in metrics_socket.lines}
    assert set(logged) == {"validation_loss", "accuracy", "perplexity"}
    assert all(line["step"] == 3 for line in logged.values())
    summary = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert summary["step"] == 3
    assert summary["validation_loss"] == pytest.approx(logged["validation_loss"]["value"])
    assert json.loads(done.stdout.strip().splitlines()[-1])["data"] == "built-in split 'small'"


def test_evaluate_reads_the_stage_dataset_from_ciuic_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train.train(settings(steps=1), tmp_path / "trial")
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-1.txt").write_text("12 + 30 = 42.\n" * 20)
    monkeypatch.setenv("CIUIC_DATA_FULL_TEST_SET", str(data))
    monkeypatch.delenv("CIUIC_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("CIUIC_METRICS_SOCKET", raising=False)

    code = evaluate.main(
        ["--checkpoint", str(tmp_path / "trial" / "checkpoints"), "--dataset", "full-test-set"]
    )

    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["data"].startswith("full-test-set (CIUIC_DATA_FULL_TEST_SET=")
    assert summary["tokens"] == (20 * 14 - 1) // 32 * 32  # whole windows of seq_len 32
    assert 0.0 <= summary["accuracy"] <= 1.0


def test_evaluate_without_a_checkpoint_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CIUIC_INIT_CHECKPOINT", raising=False)

    assert evaluate.main([]) == 2
    assert "CIUIC_INIT_CHECKPOINT" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_torchrun_trains_and_rank_zero_checkpoints(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            "train.py",
            "--steps",
            "4",
            "--output-dir",
            str(tmp_path),
            *(f"--set={key}={value}" for key, value in {**FAST, "eval_every": 4}.items()),
        ],
        cwd=EXAMPLE,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in done.stdout
    assert done.stdout.count("validation_loss=") == 2  # steps 0 and 4, by rank 0 alone
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004.pt"]


# --- the pipeline ----------------------------------------------------------------------------
def test_pipeline_file_validates_with_the_demo_sweep() -> None:
    pipeline = load_pipeline((EXAMPLE / ".ciuicci.yaml").read_text())

    training = pipeline.training
    assert training is not None
    assert (training.strategy, training.nodes, training.gpus_per_node) == ("ddp", 2, 0)
    assert training.trial_count == 6
    assert training.objective.metric == "validation_loss"
    assert training.objective.mode == "min"
    names = {p.name for p in training.hyperparameters if isinstance(p, ValuesParameter)}
    assert names == {"learning_rate", "batch_size"}
    train.load_settings({p.name: p.values[0] for p in training.hyperparameters})  # known names
    assert pipeline.validation is not None
    stages = {stage.name: stage for stage in pipeline.validation.stages}
    assert set(stages) == {"quick-check", "thorough-eval"}
    assert all("evaluate.py" in stage.command for stage in stages.values())
    assert "accuracy >= baseline - 0.01" in stages["quick-check"].gates
    trigger = pipeline.triggers[0]
    assert matches_any(trigger.paths, "model.py")
    assert matches_any(trigger.paths, "requirements.txt")
    assert not matches_any(trigger.paths, "README.md")

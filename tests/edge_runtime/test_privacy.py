"""DP-SGD's parts: per-example gradients from one batched backward equal those of one example at a time, each
clipped to at most C; the noise has std σ·C; the ε reported is the accountant's; bad asks are refused."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant

from coordinator.adapters import adapter_kind
from coordinator.bundles.request import BundleRequest
from edge_runtime.backends.per_sample import PerSampleGradients, clipped_sum, noised_mean
from edge_runtime.bundle import verify_bundle
from edge_runtime.errors import ConfigError
from edge_runtime.manifest import CLASSIFICATION, LANGUAGE_MODEL, DPTarget, Manifest
from edge_runtime.privacy import DPPlan, PrivacyLedger, epsilon_spent, noise_multiplier_for, parse_dp
from edge_runtime.torch_graph import IGNORE_INDEX, TrainingGraph
from edge_runtime.trainer import TrainOptions, plan_training, train_bundle
from exporters.bundle import load_private_key, seal_bundle
from tests.conftest import make_bundle, make_model

PATHS = {"llama": ("model", "lm_head"), "gpt2": ("transformer", "lm_head")}


def _graph(family: str, kind: str, task: str) -> tuple[TrainingGraph, dict[str, torch.nn.Parameter]]:
    model = make_model(family, num_layers=4)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    adapter = adapter_kind(kind).attach(model, 1, 1)
    with torch.no_grad():  # LoRA's B and the added biases start at zero: move them so every gradient is non-trivial
        for parameter in adapter.values():
            parameter.add_(0.1 * torch.randn_like(parameter))
    for parameter in adapter.values():
        parameter.requires_grad_(True)
    graph = TrainingGraph(model, *PATHS[family], task)
    return graph, {f"causal_lm.{name}": parameter for name, parameter in adapter.items()}


def _batch(task: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padded rows
    mask[3, 3:] = 0
    if task == CLASSIFICATION:
        return ids, mask, torch.tensor([5, 9, 5, 9])
    labels = torch.where(mask[:, 1:] == 1, ids[:, 1:], IGNORE_INDEX)
    return ids, mask, labels.reshape(-1)


def _row_losses(graph: TrainingGraph, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    losses = torch.nn.functional.cross_entropy(graph(ids, mask), labels, ignore_index=IGNORE_INDEX, reduction="none")
    if graph.kind == CLASSIFICATION:
        return losses
    counted = (labels != IGNORE_INDEX).reshape(len(ids), -1)
    return losses.reshape(len(ids), -1).sum(dim=1) / counted.sum(dim=1)


@pytest.mark.parametrize(
    ("family", "kind", "task"),
    [
        ("llama", "bias", CLASSIFICATION),
        ("llama", "lora", CLASSIFICATION),
        ("llama", "lora", LANGUAGE_MODEL),
        ("gpt2", "bias", LANGUAGE_MODEL),  # Conv1D and LayerNorm biases
        ("gpt2", "lora", CLASSIFICATION),  # LoRA on the fused Conv1D
    ],
)
def test_per_example_gradients_equal_one_example_at_a_time_and_clip_to_c(family, kind, task) -> None:
    graph, parameters = _graph(family, kind, task)
    ids, mask, labels = _batch(task)
    sampler = PerSampleGradients(graph, parameters)
    with sampler.capture():
        _row_losses(graph, ids, mask, labels).sum().backward()
    per_labels = labels.reshape(len(ids), -1)
    for row in range(len(ids)):
        for parameter in parameters.values():
            parameter.grad = None
        _row_losses(graph, ids[row : row + 1], mask[row : row + 1], per_labels[row].reshape(-1)).sum().backward()
        for name, parameter in parameters.items():
            # Batched and one-row products sum in other orders (and MKL picks its threads by the machine's load):
            # entries near zero differ by float32 rounding of the tensor's largest ones, not of their own size.
            scale = float(parameter.grad.abs().max())
            torch.testing.assert_close(sampler.grads[name][row], parameter.grad, rtol=1e-4, atol=1e-5 * scale)
    clip = 0.5 * min(float(n) for n in clipped_sum(sampler.grads, 1e9)[1])  # every example's norm is over C
    for row in range(len(ids)):
        one = {name: grads[row : row + 1] for name, grads in sampler.grads.items()}
        summed, _ = clipped_sum(one, clip)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in summed.values()))
        assert norm <= clip * (1 + 1e-5) and norm >= clip * 0.999  # clipped to C exactly, never above


def test_bias_hooks_keep_no_layer_input_alive() -> None:
    layer = torch.nn.Linear(4, 3)
    layer.weight.requires_grad_(False)  # frozen, as in a bias adapter: autograd itself keeps no input to it
    sampler = PerSampleGradients(layer, {"bias": layer.bias})
    with sampler.capture():
        hidden = torch.randn(2, 5, 4)
        output, address = layer(hidden), hidden.data_ptr()
        del hidden
        alive = [t for t in gc.get_objects() if type(t) is torch.Tensor and t.data_ptr() == address]
        assert not alive  # the per-example rule for a bias reads only the output gradient
        output.sum().backward()
    torch.testing.assert_close(sampler.grads["bias"], torch.full((2, 3), 5.0))


def test_a_kind_without_a_per_example_rule_is_refused_by_name() -> None:
    graph, _ = _graph("llama", "bias", CLASSIFICATION)
    norm = dict(graph.named_parameters())["causal_lm.model.layers.0.input_layernorm.weight"]
    with pytest.raises(ConfigError, match=r"no per-example gradient for .*input_layernorm.weight \(LlamaRMSNorm"):
        PerSampleGradients(graph, {"causal_lm.model.layers.0.input_layernorm.weight": norm})


def test_the_noise_has_standard_deviation_sigma_times_clip() -> None:
    generator = torch.Generator().manual_seed(0)
    total = torch.full((200_000,), 3.0)
    noised = noised_mean(total, noise_std=0.8 * 1.5, expected_rows=4.0, generator=generator)
    noise = noised * 4.0 - total
    assert abs(float(noise.mean())) < 0.01
    assert float(noise.std()) == pytest.approx(1.2, rel=0.01)  # sampling error of the std: ~0.16 % here


def test_the_epsilon_reported_is_the_accountants_and_within_the_target() -> None:
    plan = DPPlan.make(DPTarget(3.0, 1e-5, 1.0), batch_size=8, examples=1000, steps=300)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.008, dp_event.GaussianDpEvent(plan.noise_multiplier)), 300)
    assert plan.sampling_rate == 0.008 and plan.expected_batch == 8.0
    assert plan.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert 2.9 < plan.epsilon <= 3.0  # the least noise that meets the target: a little less breaks it
    assert epsilon_spent(plan.noise_multiplier - 0.01, 0.008, 300, 1e-5) > 3.0
    record = plan.record()
    assert (record.epsilon, record.noise_multiplier, record.steps, record.target_epsilon) == (
        pytest.approx(plan.epsilon, abs=1e-6),
        pytest.approx(plan.noise_multiplier, abs=1e-6),
        300,
        3.0,
    )


def test_bad_privacy_asks_are_refused_with_the_fix() -> None:
    assert parse_dp("epsilon=3") == DPTarget(3.0, 1e-5, 1.0)
    assert parse_dp("epsilon=8,delta=1e-6,clip=0.5") == DPTarget(8.0, 1e-6, 0.5)
    for text, says in [
        ("delta=1e-5", "names no epsilon"),
        ("epsilon=0", "must be a positive number"),
        ("epsilon=3,delta=2", "must be in (0, 1)"),
        ("epsilon=3,sigma=1", "is not epsilon=E"),
        ("epsilon=x", "'x' is not a number"),
    ]:
        with pytest.raises(ConfigError, match=says.replace("(", r"\(").replace(")", r"\)")):
            parse_dp(text)
    with pytest.raises(ConfigError, match="more noise than any useful training"):
        noise_multiplier_for(DPTarget(1e-4, 1e-9), 1.0, 10_000)


@pytest.mark.parametrize("kind", ["bias", "lora"])
def test_a_dp_bundle_trains_on_torch_and_reports_what_it_spent(tmp_path, kind) -> None:
    bundle = make_bundle(tmp_path, "torch", "--adapter-kind", kind, "--dp", "epsilon=4,delta=1e-5,clip=0.5")
    manifest = verify_bundle(bundle["bundle"], bundle["trust"])
    assert manifest.privacy == DPTarget(4.0, 1e-5, 0.5) and manifest.backends == ["torch"]
    assert manifest.plan.shape.per_example_gradients and manifest.plan.predicted["per_example_gradients"] > 0
    options = TrainOptions(steps=30, threads=1, progress=False)
    metrics = train_bundle(bundle["bundle"], bundle["data"], tmp_path / "out", bundle["trust"], options)
    privacy = metrics["privacy"]
    assert privacy["accountant"] == "rdp" and privacy["target_epsilon"] == 4.0 and privacy["steps"] == 30
    assert privacy["sampling_rate"] == pytest.approx(8 / 64) and privacy["clip_norm"] == 0.5
    assert 0 < privacy["epsilon"] <= 4.0
    assert privacy["epsilon"] == pytest.approx(
        epsilon_spent(privacy["noise_multiplier"], privacy["sampling_rate"], 30, 1e-5), rel=1e-4
    )
    assert 15 * 8 < metrics["samples"] < 45 * 8  # Poisson draws: about 8 rows a step


def test_dp_asks_the_exporter_cannot_meet_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--dp trains bias or lora adapters"):
        BundleRequest(adapter_kind="layers", dp=DPTarget(3.0))
    with pytest.raises(ConfigError, match="--dp runs on the PyTorch backend only"):
        BundleRequest(adapter_kind="bias", backends=("ort",), dp=DPTarget(3.0))
    assert BundleRequest(adapter_kind="bias", dp=DPTarget(3.0)).backends_for(None) == ("torch",)  # type: ignore[arg-type]


def test_a_dp_bundle_refuses_the_ort_backend_with_the_reason(tmp_path) -> None:
    bundle = make_bundle(tmp_path, "ort,torch", "--adapter-kind", "bias")
    data = json.loads((bundle["bundle"] / "manifest.json").read_text())
    resealed = Manifest.from_json(json.dumps(data | {"privacy": {"epsilon": 3.0}}))  # as a DP export would
    seal_bundle(bundle["bundle"], resealed, load_private_key(bundle["key"]))
    with pytest.raises(ConfigError, match=r"ONNX Runtime 1\.19's training graphs give only the batch's sum"):
        plan_training(bundle["bundle"], bundle["data"], bundle["trust"], TrainOptions(backend="ort", progress=False))


def test_a_device_at_its_lifetime_budget_refuses_the_next_job_even_after_a_restart(tmp_path) -> None:
    import shutil
    import time

    from coordinator.fleet.broker import free_port
    from device_profiles import load_profile
    from edge_runtime.daemon import DaemonConfig, EdgeDaemon
    from edge_runtime.mqtt import BrokerAddress
    from edge_runtime.wire import Job

    bundle = make_bundle(tmp_path, "torch", "--adapter-kind", "bias", "--dp", "epsilon=3")
    config = DaemonConfig(
        "a", load_profile("laptop-16gb"), {"reviews": bundle["data"]}, bundle["trust"], tmp_path / "device",
        isolate=False, privacy_budget=5.0,
    )  # fmt: skip
    transfer = "ab" * 32
    offer = {"transfer": transfer, "name": "bundle", "size": 1, "chunk_bytes": 1}

    def run(daemon: EdgeDaemon, job_id: str) -> dict:
        shutil.copytree(bundle["bundle"], daemon.bundles_dir / transfer, dirs_exist_ok=True)
        job = Job(job_id, "a", 1, "reviews", 4, offer, None, time.time(), job_id)
        daemon._job_dir(job_id).mkdir(parents=True)
        (daemon._job_dir(job_id) / "job.json").write_text(json.dumps(job.to_dict()))
        daemon._train(job, daemon._job_dir(job_id))
        return daemon._job_state(job_id)

    daemon = EdgeDaemon(config, BrokerAddress("127.0.0.1", free_port()))
    assert run(daemon, "job-1-r1")["state"] == "trained"
    spent = daemon.ledger.spent
    assert 2.5 < spent <= 3.0
    refused = run(daemon, "job-2-r1")
    assert refused["state"] == "rejected"
    assert f"lifetime budget is ε = 5 and {spent:.3f} is spent (1 jobs)" in refused["reason"]
    daemon.step(wait=0.01)  # and it goes on serving
    restarted = EdgeDaemon(config, BrokerAddress("127.0.0.1", free_port()))
    assert restarted.ledger.spent == pytest.approx(spent)  # a restart resets nothing
    assert run(restarted, "job-3-r1")["state"] == "rejected"
    plain = PrivacyLedger(tmp_path / "other.json", 5.0)
    with pytest.raises(ConfigError, match="trains only with differential privacy"):
        plain.charge("job-9-r1", None)

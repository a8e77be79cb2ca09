"""ModelEMA of a model sharded by FSDP2 (ema_kit/_sharded.py): two CPU processes, gloo, under torchrun.

The slow tests launch ``torchrun --nproc-per-node=2`` on this file, whose ``__main__`` part is the per-rank
program (``worker``), then check what the ranks wrote against a single-process float64 reference. The
others run in this process, on a process group of one (``one_process``), or need no group at all.
"""

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ReferenceEMA, max_error, small_cnn
from torch import nn

from ema_kit import Callback, ModelEMA, MultiEMA
from ema_kit._sharded import check_supported, is_sharded
from ema_kit.files import load_weights

WORLD_SIZE, STEPS, DECAY, LR, BATCH = 2, 6, 0.8, 0.05, 8
COLLECTIVE = ("c10d::", "gloo:", "nccl:")  # how the profiler names collectives: c10d::allreduce_, ...
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cpu")  # the ranks' device: set by worker from TEST_DEVICE


def sharded_cnn() -> nn.Module:
    """A small CNN with BatchNorm; 9 classes, so the last layer's 9 rows split unevenly (5 and 4) over 2."""
    return small_cnn(num_classes=9)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's half of a step's global batch."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    images = torch.randn(BATCH, 1, 8, 8, generator=generator)
    return images, torch.randint(0, 9, (BATCH,), generator=generator)


def probe() -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def torchrun(
    tmp_path: Path, *args: str, check: bool = True, processes: int = WORLD_SIZE, device: str = "cpu"
) -> subprocess.CompletedProcess:
    """This file's worker on two CPU processes (gloo), or on CUDA (NCCL); output in tmp_path/torchrun.txt."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command.append(f"--nproc-per-node={processes}")
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "TEST_DEVICE": device,
    }
    with open(tmp_path / "torchrun.txt", "a") as out:
        done = subprocess.run(
            [*command, __file__, *args], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300
        )
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed:\n{(tmp_path / 'torchrun.txt').read_text()[-6000:]}")
    return done


# -- the per-rank programs ------------------------------------------------------------------------------


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            fully_shard(layer)
    return fully_shard(model)


def train_step(model, optimizer, rank: int, step: int) -> None:
    x, y = batch(rank, step)
    x, y = x.to(DEVICE, next(model.parameters()).dtype), y.to(DEVICE)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def average(out: Path, rank: int, warmup: str, buffers: str) -> None:
    """Train in float64 with an EMA (or a MultiEMA) of the sharded model; write what the test checks."""
    from torch.distributed.tensor import DTensor
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = shard(sharded_cnn().double().to(DEVICE))
    settings = dict(warmup=warmup == "warmup", buffers=buffers)
    ema = ModelEMA(model, decay=DECAY, **settings)
    multi = MultiEMA(model, decays=(DECAY, 0.5), **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    collectives = set()
    for step in range(STEPS):
        train_step(model, optimizer, rank, step)
        if step not in (0, STEPS - 1):  # the first update and a later one, profiled: starting the profiler
            ema.update(model)  # every step aborted a process now and then (in torch's profiler)
            multi.update(model)
            continue
        with profile(activities=[ProfilerActivity.CPU]) as updating:
            ema.update(model)
            multi.update(model)
        collectives |= {event.name for event in updating.events() if event.name.startswith(COLLECTIVE)}
    weights = ema.state_dict()["weights"]
    local = sum(v.to_local().numel() for v in weights.values() if isinstance(v, DTensor))
    whole = sum(v.numel() for v in weights.values() if isinstance(v, DTensor))
    before = {k: v.full_tensor() for k, v in model.state_dict().items() if isinstance(v, DTensor)}
    with ema.applied_to(model) as applied:
        applied.eval()
        scored = applied(probe().double().to(DEVICE))
    after = {k: v.full_tensor() for k, v in model.state_dict().items() if isinstance(v, DTensor)}
    ema.save(out / "ema.pth")
    multi.emas[DECAY].save(out / "multi.pth")
    torch.save(
        {
            "buffers": {k: v.cpu() for k, v in weights.items() if not isinstance(v, DTensor)},
            "collectives": sorted(collectives),
            "elements": [local, whole],
            "scored": scored.detach().cpu(),
            "restored": all(torch.equal(before[k], after[k]) for k in before),
        },
        out / f"rank{rank}.pth",
    )


class Kill(Callback):
    """Ends every rank at the start of an epoch, as a lost machine would (no cleanup, no files)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_start(self, state) -> None:
        if state.epoch == self.epoch:
            os._exit(3)


def train(out: Path, rank: int, kill_at: str) -> None:
    """fit an FSDP2 model for 3 epochs with an EMA, resuming the run in ``out`` if there is one."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from ema_kit import LiveLog, fit
    from ema_kit.examples.digits import digits

    images, labels = digits()
    labels = labels % 9
    train_set = TensorDataset(images[:256], labels[:256])
    train_loader = DataLoader(train_set, batch_size=32, sampler=DistributedSampler(train_set, seed=0))
    val_loader = DataLoader(TensorDataset(images[256:384], labels[256:384]), batch_size=64)
    torch.manual_seed(0)
    model = shard(sharded_cnn())
    ema = ModelEMA(model, decay=0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kill = Kill(int(kill_at))
    with open(out / f"stdout{rank}.txt", "a") as printed, contextlib.redirect_stdout(printed):
        log = fit(model, train_loader, val_loader, epochs=3, optimizer=optimizer, ema=ema, device="cpu",
                  out_dir=out / "run", resume="auto", callbacks=[LiveLog(progress="text"), kill])  # fmt: skip
    ema.save(out / "final_ema.pth")
    if rank == 0:
        log.drop(columns="seconds").to_csv(out / "log.csv", index=False)


def resume(out: Path, rank: int) -> None:
    """A hand-written loop: the EMA's sharded state saved with torch.distributed.checkpoint mid-run, loaded
    into a new EMA, which then goes on as the first one does."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = shard(sharded_cnn())
    ema = ModelEMA(model, decay=DECAY)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step in range(STEPS):
        if step == STEPS // 2:
            # Buffers are each rank's own, not sharded: save rank 0's (DCP keeps one copy of a plain tensor).
            keep = dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True)
            dcp.save({"ema": ema.state_dict()}, checkpoint_id=out / "ema_dcp", planner=keep)
            resumed = ModelEMA(model, decay=0.5)  # other values and settings: the load replaces them
            state = {"ema": resumed.state_dict()}
            dcp.load(state, checkpoint_id=out / "ema_dcp")
            resumed.load_state_dict(state["ema"])
        train_step(model, optimizer, rank, step)
        ema.update(model)
        if step >= STEPS // 2:
            resumed.update(model)
    mine = {k: v.to_local() if isinstance(v, DTensor) else v for k, v in ema.state_dict()["weights"].items()}
    theirs = resumed.state_dict()
    torch.save(
        {"differ": [k for k, v in theirs["weights"].items()
                  if not torch.equal(mine[k], v.to_local() if isinstance(v, DTensor) else v)],
         "counters": [theirs["num_updates"], theirs["settings"]["decay"]]},
        out / f"rank{rank}.pth",
    )  # fmt: skip


def nonfinite(out: Path, rank: int) -> None:
    """skip_non_finite with a NaN in one rank's shard only: every rank skips that update."""
    import warnings

    torch.manual_seed(0)
    model = shard(sharded_cnn())
    ema = ModelEMA(model, decay=DECAY, skip_non_finite=True)
    ema.update(model)
    if rank == 1:
        with torch.no_grad():
            model[9].weight.to_local()[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema.update(model)
    counts = [ema.num_updates, ema.num_skipped, len(caught)]
    finite = bool(ema.state_dict()["weights"]["9.weight"].full_tensor().isfinite().all())
    torch.save({"counts": counts, "finite": finite}, out / f"rank{rank}.pth")


def worker(program: str, out: str, *args: str) -> None:
    """Run ``program`` on this rank, tear the process group down, and leave without Python's shutdown.

    torch's worker threads outlive ``destroy_process_group`` here: DTensor's caches (sharding propagation,
    redistribute plans) keep FSDP2's device mesh, and with it the process group, alive. A gloo thread that
    frees the last reference to a tensor of a just-finished collective takes the GIL to do so; if that comes
    after interpreter shutdown began, Python ends the thread inside a C++ destructor: "terminate called
    without an active exception", an abort (in about one run of this file in five, in any of its torchrun
    tests). ``os._exit`` skips that shutdown, as multiprocessing's forked children do; every file was
    written and closed before.
    """
    import torch.distributed as dist

    global DEVICE
    torch.set_num_threads(1)
    if os.environ["TEST_DEVICE"] == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    try:
        {"average": average, "train": train, "resume": resume, "nonfinite": nonfinite}[program](
            Path(out), dist.get_rank(), *args
        )
        dist.barrier()  # no rank tears its process group down while another still talks to it
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# -- the tests --------------------------------------------------------------------------------------------


def float64_reference(warmup: bool, buffers: str, world: int = WORLD_SIZE) -> list[dict]:
    """The same training in float64 in one process, and each rank's EMA of it.

    The gradient is the mean of the ranks' gradients (FSDP2 reduce-scatters their mean). BatchNorm's
    running stats are each rank's own: FSDP2 leaves buffers alone, and each rank updates its from its batch.
    """
    torch.manual_seed(0)
    model = sharded_cnn().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    emas = [ReferenceEMA(copy.deepcopy(model)) for _ in range(world)]
    parameters, buffers_of = list(model.parameters()), list(model.buffers())
    rank_buffers = [[b.clone() for b in buffers_of] for _ in range(world)]
    for step in range(STEPS):
        gradients = []
        for rank in range(world):
            with torch.no_grad():
                torch._foreach_copy_(buffers_of, rank_buffers[rank])
            x, y = batch(rank, step)
            model.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
            gradients.append([p.grad for p in parameters])
            rank_buffers[rank] = [b.clone() for b in buffers_of]
        for parameter, *grads in zip(parameters, *gradients):
            parameter.grad = sum(grads) / world
        optimizer.step()
        step_decay = min(DECAY, (1 - 1 / (step + 1)) ** 8) if warmup else DECAY
        for ema, values in zip(emas, rank_buffers):
            with torch.no_grad():
                torch._foreach_copy_(buffers_of, values)
            ema.update(model, step_decay, buffers)
    return [ema.state for ema in emas]


@pytest.mark.slow
@pytest.mark.parametrize("warmup, buffers", [("warmup", "average"), ("no-warmup", "copy")])
def test_sharded_ema_matches_a_float64_single_process_ema_and_communicates_nothing(tmp_path, warmup, buffers):
    torchrun(tmp_path, "average", str(tmp_path), warmup, buffers)
    references = float64_reference(warmup == "warmup", buffers)
    ranks = [torch.load(tmp_path / f"rank{rank}.pth", weights_only=True) for rank in range(WORLD_SIZE)]
    # The whole EMA, gathered by save (rank 0's buffers), and each rank's own buffers.
    saved = load_weights(tmp_path / "ema.pth")
    assert max_error(saved, references[0]) < 1e-12  # float64 both: the same sums in the same order
    for rank, reference in zip(ranks, references):
        assert max_error(rank["buffers"], {k: reference[k] for k in rank["buffers"]}) < 1e-12
    assert not torch.equal(ranks[0]["buffers"]["1.running_mean"], ranks[1]["buffers"]["1.running_mean"])
    # A MultiEMA's set of the same decay is the same EMA, to the bit.
    multi = load_weights(tmp_path / "multi.pth")
    assert all(torch.equal(multi[k], saved[k]) for k in saved)
    # No collective inside update; each rank holds about half of the parameters' EMA (9 rows: 5 and 4).
    for rank in ranks:
        assert rank["collectives"] == []
        local, whole = rank["elements"]
        assert abs(local / whole - 1 / WORLD_SIZE) < 0.01
    # The sharded model ran with the EMA weights inside applied_to, and got its own back after.
    unsharded = sharded_cnn().double()
    unsharded.load_state_dict(saved)
    expected = unsharded.eval()(probe().double())
    assert torch.allclose(ranks[0]["scored"], expected, rtol=0, atol=1e-12)
    assert all(rank["restored"] for rank in ranks)


@pytest.mark.slow
def test_with_skip_non_finite_every_rank_skips_an_update_that_one_rank_s_shard_makes_non_finite(tmp_path):
    torchrun(tmp_path, "nonfinite", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pth", weights_only=True) for rank in range(WORLD_SIZE)]
    assert [rank["counts"] for rank in ranks] == [[1, 1, 1]] * WORLD_SIZE  # one update, one skip, warned
    assert all(rank["finite"] for rank in ranks)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_sharded_ema_on_cuda_with_nccl_matches_a_float64_single_process_ema(tmp_path):
    # One process: NCCL refuses two ranks on one GPU. The shards then are whole tensors, but every path
    # (DTensor shadows on CUDA, NCCL gathers for save and applied_to) runs.
    torchrun(tmp_path, "average", str(tmp_path), "warmup", "average", processes=1, device="cuda")
    (reference,) = float64_reference(True, "average", world=1)
    rank = torch.load(tmp_path / "rank0.pth", weights_only=True)
    saved = load_weights(tmp_path / "ema.pth")
    assert max_error(saved, reference) < 1e-9  # CUDA's float64 kernels round otherwise than the CPU's
    assert rank["collectives"] == [] and rank["restored"]
    unsharded = sharded_cnn().double()
    unsharded.load_state_dict(saved)
    assert torch.allclose(rank["scored"], unsharded.eval()(probe().double()), rtol=0, atol=1e-9)


@pytest.mark.slow
def test_fit_trains_a_sharded_model_and_a_killed_run_resumes_to_the_same_ema(tmp_path):
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    torchrun(tmp_path / "whole", "train", str(tmp_path / "whole"), "0")
    killed = torchrun(tmp_path / "killed", "train", str(tmp_path / "killed"), "3", check=False)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "final_ema.pth").exists()
    torchrun(tmp_path / "killed", "train", str(tmp_path / "killed"), "0")  # resume="auto" continues epoch 3

    whole, resumed = tmp_path / "whole", tmp_path / "killed"
    assert (whole / "log.csv").read_text() == (resumed / "log.csv").read_text()
    for name in ("final_ema.pth", "run/model_ema.pth"):
        a, b = load_weights(whole / name), load_weights(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # The files are plain state dicts of the whole model: they load into the unsharded one.
    for name in ("final_ema.pth", "run/model_ema.pth"):
        sharded_cnn().load_state_dict(torch.load(whole / name, weights_only=True))
    assert "epoch 3/3" in (whole / "stdout0.txt").read_text()
    assert (whole / "stdout1.txt").read_text() == ""  # one process shows, one writes


@pytest.mark.slow
def test_a_hand_written_loop_resumes_from_the_sharded_state_saved_with_torch_distributed_checkpoint(tmp_path):
    torchrun(tmp_path, "resume", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pth", weights_only=True) for rank in range(WORLD_SIZE)]
    assert all(rank["counters"] == [STEPS, DECAY] for rank in ranks)
    assert ranks[0]["differ"] == []  # bit-exact: every shard, and the buffers save() and fit write
    # Rank 1 resumed with rank 0's BatchNorm statistics, the one copy saved; its shards are its own.
    assert set(ranks[1]["differ"]) <= {f"{i}.running_{s}" for i in (1, 4) for s in ("mean", "var")}


@pytest.fixture
def one_process(tmp_path):
    """A process group of one (gloo), so that fully_shard works in this process; taken down after."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_model() -> nn.Module:
    torch.manual_seed(0)
    return shard(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))


def test_a_sharded_ema_has_no_module_and_says_what_to_use(one_process):
    ema = ModelEMA(sharded_model())
    assert ema.sharded and "module=FSDPSequential" in repr(ema)
    with pytest.raises(AttributeError, match=r"no module of its own.*applied_to\(model\).*ema.save"):
        _ = ema.module


def test_what_a_sharded_ema_cannot_do_is_refused_before_anything_is_built(one_process):
    from ema_kit import PostHocEMA

    model = sharded_model()
    with pytest.raises(ValueError, match="bfloat16-stochastic.*not supported on a sharded model"):
        ModelEMA(model, dtype="bfloat16-stochastic")
    with pytest.raises(ValueError, match="keeps whole copies of the model; ModelEMA and MultiEMA"):
        PostHocEMA(model, snapshot_every=10)


def test_sharding_the_model_after_building_its_ema_is_refused_by_update(one_process):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    ema = ModelEMA(model)
    shard(model)
    with pytest.raises(ValueError, match=r"sharded after this EMA was built.*after sharding the model"):
        ema.update(model)


def test_a_sharded_ema_loads_a_whole_state_and_refuses_another_sharding(one_process):
    from torch.distributed.tensor import Replicate

    model = sharded_model()
    ema, other = ModelEMA(model), ModelEMA(model, decay=0.5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    ema.update(model)
    state = ema.state_dict()
    whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state["weights"].items()}
    other.load_state_dict(state | {"weights": whole})  # a gathered state: each rank keeps its part
    loaded, saved = other.state_dict()["weights"], state["weights"]
    assert all(torch.equal(loaded[k].to_local(), saved[k].to_local()) for k in ("0.weight", "2.bias"))
    stochastic = state["settings"] | {"dtype": "bfloat16-stochastic"}
    with pytest.raises(ValueError, match="bfloat16-stochastic.* shadows, which an EMA of a sharded model"):
        other.load_state_dict(state | {"settings": stochastic})
    replicated = saved["0.weight"].redistribute(placements=[Replicate()])
    with pytest.raises(ValueError, match=r"0.weight is sharded as .*Replicate.*the model's as .*Shard"):
        other.load_state_dict(state | {"weights": whole | {"0.weight": replicated}})


def test_resuming_an_unsharded_run_with_a_sharded_model_is_refused_before_anything_loads(
    one_process, tmp_path
):
    from torch.utils.data import DataLoader, TensorDataset

    from ema_kit import LiveLog, fit

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator)
    )
    loader = DataLoader(data, batch_size=16)

    def run(model, **options):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        quiet = [LiveLog(progress="off", plot=False)]
        return fit(model, loader, loader, epochs=1, optimizer=optimizer, ema=0.5, callbacks=quiet, **options)

    torch.manual_seed(0)
    run(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), out_dir=tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    model = sharded_model()
    weights = {k: v.full_tensor() for k, v in model.state_dict().items() if hasattr(v, "full_tensor")}
    with pytest.raises(ValueError, match="model was not sharded, and this run's is sharded by FSDP2"):
        run(model, out_dir=tmp_path / "run", resume=True)
    assert all(
        torch.equal(v.full_tensor(), weights[k]) for k, v in model.state_dict().items() if k in weights
    )
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_unsharded_models_take_the_usual_path():
    model = nn.Linear(2, 1)
    assert not is_sharded(model) and not ModelEMA(model).sharded
    check_supported(model)  # nothing to refuse


def test_fsdp1_is_refused_by_name_with_what_to_use():
    import torch.distributed.fsdp as fsdp

    class Wrapped(fsdp.FullyShardedDataParallel):  # an instance without a process group
        def __init__(self):
            nn.Module.__init__(self)

    with pytest.raises(TypeError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        ModelEMA(nn.Sequential(Wrapped(), nn.Linear(2, 1)))


def test_deepspeed_is_refused_by_name_with_what_to_use():
    engine = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})()
    engine.module = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"DeepSpeed engine.*ModelEMA\(engine.module\).*fully_shard"):
        ModelEMA(engine)
    zero3 = nn.Linear(2, 1)
    zero3.weight.ds_id = 0  # how ZeRO stage 3 marks a partitioned parameter
    with pytest.raises(TypeError, match=r"weight is partitioned by DeepSpeed ZeRO stage 3"):
        ModelEMA(zero3)


if __name__ == "__main__":
    worker(*sys.argv[1:])

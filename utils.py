"""Shared plumbing: user-facing errors, devices, seeds, checkpoints, grids, logs, processes."""
import contextlib
import json
import os
import random
import sys

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: reported as one line on stderr, never as a traceback."""


def run_cli(main):
    """Run `main()`, turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ------------------------------------------------------------------------------------------------
# Device, seeds and output folders

def pick_device(name="auto"):
    """torch.device for `name`; 'auto' takes cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for, but MPS is not available here")
    return device


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_output_dir(path, what="--out"):
    """Create `path` (with parents) and check that files can be written in it."""
    if not path:
        raise UserError(f"{what} must name a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {what} folder {path!r}: {e.strerror}") from None
    return path


# ------------------------------------------------------------------------------------------------
# Checkpoints: one self-describing file, written atomically

CHECKPOINT_NAME = "checkpoint"
FORMAT_VERSION = 1


def rng_state():
    """Every random generator's state, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def rng_entries():
    """Checkpoint entries of the random state: "rng" (rank 0's, what a one-process resume reads)
    and, in a process group, "rng_by_rank" with every process's own. Every process must call it
    (it gathers)."""
    states = gather_objects(rng_state())
    return {"rng": states[0], **({"rng_by_rank": states} if len(states) > 1 else {})}


def restore_rng(ckpt, rank, world, seed):
    """Put back this process's random state: its own when the run is resumed at the world size
    it was saved at; else rank 0 takes the saved one and every other rank a stream of its own,
    seeded from (seed, rank, step), so that no two processes draw the same noise."""
    by_rank = ckpt.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world:
        set_rng_state(by_rank[rank])
        return
    set_rng_state(ckpt["rng"])
    if rank > 0:
        seed_everything(int(np.random.SeedSequence([seed, rank, ckpt.get("step", 0)])
                            .generate_state(1)[0]))


def save_checkpoint(path, state):
    """torch.save to `path` through a temporary file, so a kill never leaves a broken checkpoint."""
    tmp = f"{path}.tmp"
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def checkpoint_path(path):
    """`path` itself if it is a file, else the checkpoint inside the folder `path`."""
    return path if os.path.isfile(path) else os.path.join(path, CHECKPOINT_NAME)


def load_checkpoint(path, method=None):
    """Load a checkpoint written by save_checkpoint (for `method`, if given) or raise UserError."""
    import checkpoint_import  # here: it imports models, which imports this module
    file = checkpoint_path(path)
    original = checkpoint_import.overlord_folder(path)
    if original is not None:  # avivga/overlord's config.pkl, latent.pth, amortized.pth
        ckpt = checkpoint_import.import_overlord(original)
    elif not os.path.exists(file):
        raise UserError(f"--load {path!r}: no checkpoint there (expected a file or a folder "
                        f"holding '{CHECKPOINT_NAME}', or an original OverLORD model folder)")
    else:
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:
            raise UserError(f"--load {path!r}: {file} is not a checkpoint of this program") \
                from None
        if checkpoint_import.is_kozistr_checkpoint(ckpt):
            ckpt = checkpoint_import.import_kozistr(ckpt, file)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt or "config" not in ckpt:
        raise UserError(f"--load {path!r}: {file} is not a checkpoint of this program")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(f"--load {path!r}: written by a newer version of this program")
    if method is not None and ckpt["config"].get("method") != method:
        raise UserError(f"--load {path!r}: a checkpoint of method "
                        f"{ckpt['config'].get('method')!r}, not {method!r}")
    return ckpt


def strip_prefixes(state_dict):
    """Drop the 'module.' (DataParallel/DDP) and '_orig_mod.' (torch.compile) key prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def load_weights(module, state_dict, what):
    """load_state_dict that reports an architecture mismatch as a UserError."""
    try:
        module.load_state_dict(strip_prefixes(state_dict))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"{what} does not match this architecture ({detail})") from None


# ------------------------------------------------------------------------------------------------
# Logs and grids

class RunningMeans:
    """Means of named scalars since the last reset (so a log line is not just the last batch)."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def update(self, values):
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
        self.count += 1

    def means(self):
        return {name: total / max(self.count, 1) for name, total in self.sums.items()}

    def reset(self):
        self.sums, self.count = {}, 0


def append_jsonl(path, record):
    """Append one JSON object as a line and flush it to disk."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def write_json(path, obj):
    """Write `obj` as indented JSON through a temporary file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def save_tiles(tiles, path, nrow, value_range=(-1.0, 1.0)):
    """Save a (K, 3, H, W) batch of tiles as one PNG grid, K/nrow rows, 2-px padding."""
    from torchvision.utils import save_image
    tmp = f"{path}.tmp.png"
    save_image(tiles.detach().float().cpu(), tmp, nrow=nrow, padding=2, normalize=True,
               value_range=value_range)
    os.replace(tmp, path)


TENSORBOARD_INSTALL = "pip install -r requirements-tensorboard.txt"


class TensorBoard:
    """--tensorboard: each metrics line as scalars and each grid as an image, in RUN/tensorboard.
    Does nothing when off or on a process other than the main one."""

    def __init__(self, run_dir, enabled, main=True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_INSTALL} "
                            f"(or train without it: --no-tensorboard)") from None
        if main:
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def scalars(self, record, step, prefix=""):
        """Every number of a metrics record (but the step counters) as a scalar at `step`."""
        if self.writer is None:
            return
        for name, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and name not in ("step", "epoch"):
                self.writer.add_scalar(prefix + name, value, step)
        self.writer.flush()

    def image_file(self, tag, path, step):
        """The grid PNG at `path`, exactly as written, as image `tag` at `step`."""
        if self.writer is None:
            return
        import cv2
        rgb = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        self.writer.add_image(tag, rgb, step, dataformats="HWC")
        self.writer.flush()


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a request to stop after the current step (so the
    checkpoint saved then is a clean one); a second Ctrl-C interrupts at once."""

    def __enter__(self):
        import signal
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


# ------------------------------------------------------------------------------------------------
# Several processes (torchrun): one per device, gradients averaged before every optimiser step

def launched_by_torchrun():
    """True when torchrun (or another launcher setting RANK and WORLD_SIZE) started us."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def process_group_backend(device):
    """The backend map of a process on `device`: gloo always (CPU tensors: logged values, flags,
    gathered objects) and, on a GPU, NCCL for CUDA tensors. NCCL alone has no CPU backend, so
    every collective on a CPU tensor would fail there."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_name="auto"):
    """(rank, world size, device). Under torchrun joins the process group, even a group of one
    (so that `torchrun --nproc_per_node=1` runs the same collectives as a larger job): one GPU
    per process when CUDA is there, else the CPU."""
    import torch.distributed as dist
    if not launched_by_torchrun():
        return 0, 1, pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    return rank, world, device


def distributed():
    """True inside a process group (of any size: a group of one takes the collective path)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def average_gradients(params):
    """Average the gradients of `params` over all processes, in one flattened all-reduce (the
    arithmetic of DistributedDataParallel, without its one-forward-per-backward assumptions)."""
    if not distributed():
        return
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_values(values):
    """{name: float} averaged over all processes (for logs of the global batch). The values
    travel as a CPU tensor, which the gloo part of the group carries on every device."""
    if not distributed():
        return values
    import torch.distributed as dist
    names = sorted(values)
    t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
    dist.all_reduce(t)
    return {n: v / dist.get_world_size() for n, v in zip(names, t.tolist())}


def any_process(*flags):
    """Each flag OR-ed over all processes, so that every process takes the same branch (stop,
    or give up on a diverged run) at the same step and no collective is left waiting."""
    if not distributed():
        return [bool(f) for f in flags]
    import torch.distributed as dist
    t = torch.tensor([float(bool(f)) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]: a picklable object from every process."""
    if not distributed():
        return [obj]
    import torch.distributed as dist
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


@contextlib.contextmanager
def main_process_first(rank):
    """Rank 0 runs the block first (preparing files), then the others (reading them)."""
    import torch.distributed as dist
    if distributed() and rank != 0:
        dist.barrier()
    yield
    if distributed() and rank == 0:
        dist.barrier()


def close_distributed():
    """End a process group cleanly: wait until every process (rank 0 writing its checkpoint
    too) is done, then tear it down, so no process exits with live communication threads."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

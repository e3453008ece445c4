"""Join the processes of a multi-host job (`jax.distributed.initialize`) before anything touches a device.

Where the process group comes from, first match wins:

1. explicit arguments (`--coordinator HOST:PORT --num-processes N --process-id I`);
2. the environment `JAXALIGN_COORDINATOR`, `JAXALIGN_NUM_PROCESSES`, `JAXALIGN_PROCESS_ID`
   (what `launch/gpu.sh --nodes` exports);
3. SLURM (`SLURM_JOB_ID`, `SLURM_NTASKS` > 1, ...): coordinator = first host of the step's node list,
   one process per task; a task sees all its node's GPUs when it is the only task on its node, else
   the GPU numbered `SLURM_LOCALID` (one process per GPU);
4. a Cloud TPU VM (a Google TPU on the PCI bus): `jax.distributed.initialize()` with no arguments,
   which reads the slice's workers from the TPU metadata (a single-host slice is a group of one);
5. otherwise a single process: nothing to do.

On the CPU platform (tests: several processes on localhost) the cross-process collectives use gloo.
Every process runs the same program; each sees all devices (`jax.devices()`) and feeds only its own
(`jax.local_devices()`). Shared files are written by process 0 only (see `jaxalign.run.loop`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from jaxalign.errors import JaxalignError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXALIGN_COORDINATOR"
ENV_NUM_PROCESSES = "JAXALIGN_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXALIGN_PROCESS_ID"


@dataclass(frozen=True)
class ProcessGroup:
    """How this process joins: `source` says where the settings came from (for the log)."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @property
    def auto(self) -> bool:
        """True when jax detects the group itself (TPU pods)."""
        return self.coordinator is None and self.num_processes is None


def add_distributed_args(*parsers: argparse.ArgumentParser) -> None:
    """Add `--coordinator --num-processes --process-id` to each parser (train, pipeline)."""
    for parser in parsers:
        g = parser.add_argument_group(
            "multi-host", "Join a multi-process job. Not needed on TPU pods or under SLURM (detected), nor for one "
                          f"process. Also read from ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}.")
        g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordination service (every process passes the same)")
        g.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the job")
        g.add_argument("--process-id", type=int, default=None, metavar="I", help="this process's id, 0..N-1")


def initialize_from_cli(args: argparse.Namespace) -> bool:
    """`initialize_from_args_or_env` with the parsed flags; a no-op for commands without them."""
    if not hasattr(args, "coordinator"):
        return False
    return initialize_from_args_or_env(args.coordinator, args.num_processes, args.process_id)


def initialize_from_args_or_env(coordinator: str | None = None, num_processes: int | None = None,
                                process_id: int | None = None) -> bool:
    """Call `jax.distributed.initialize` when this is one process of several; True when it did.

    Must run before the first use of a device (`jax.devices()`, any computation). Idempotent.
    """
    import jax

    if jax.distributed.is_initialized():
        return False
    group = resolve_process_group(coordinator, num_processes, process_id)
    if group is None:
        return False
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if group.auto:
        log.info("joining the job's processes (%s, detected by jax)", group.source)
        jax.distributed.initialize()
    else:
        log.info("joining %d processes as process %d, coordinator %s (%s)", group.num_processes,
                 group.process_id, group.coordinator, group.source)
        jax.distributed.initialize(coordinator_address=group.coordinator, num_processes=group.num_processes,
                                   process_id=group.process_id,
                                   local_device_ids=list(group.local_device_ids) if group.local_device_ids else None,
                                   cluster_detection_method="deactivate")
    log.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def resolve_process_group(coordinator: str | None = None, num_processes: int | None = None,
                          process_id: int | None = None, environ=None) -> ProcessGroup | None:
    """The process group from arguments, then the environment; None for a single process."""
    env = os.environ if environ is None else environ
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in given.values()):
        return _explicit(coordinator, num_processes, process_id, "flags", tuple(given))
    names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    if any(env.get(n) for n in names):
        values = [env.get(n) or None for n in names]
        try:
            n, i = (int(v) if v is not None else None for v in values[1:])
        except ValueError:
            raise JaxalignError(f"${ENV_NUM_PROCESSES} and ${ENV_PROCESS_ID} must be integers, got "
                                f"{values[1]!r} and {values[2]!r}") from None
        return _explicit(values[0], n, i, "environment", tuple(f"${n}" for n in names))
    slurm = _slurm(env)
    if slurm is not None:
        return slurm
    if environ is None and _on_tpu_vm():
        return ProcessGroup(source="Cloud TPU VM")
    return None


def _explicit(coordinator, num_processes, process_id, source: str, names: tuple[str, ...]) -> ProcessGroup | None:
    missing = [name for name, v in zip(names, (coordinator, num_processes, process_id)) if v is None]
    if num_processes == 1 and process_id in (None, 0):
        return None
    if missing:
        raise JaxalignError(f"multi-host {source}: set all three of {', '.join(names)}; missing {', '.join(missing)}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise JaxalignError(f"multi-host {source}: process id {process_id} is not in 0..{num_processes - 1} "
                            f"(num processes {num_processes})")
    if not re.fullmatch(r"[^:\s]+:\d+", coordinator):
        raise JaxalignError(f"multi-host {source}: coordinator {coordinator!r} must be HOST:PORT")
    return ProcessGroup(source, coordinator, num_processes, process_id)


def first_slurm_host(node_list: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", node_list.strip())
    if not m:
        raise JaxalignError(f"cannot read the SLURM node list {node_list!r}")
    return m.group(1) + (m.group(2) or "")


def _slurm(env) -> ProcessGroup | None:
    if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
        return None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if ntasks <= 1:
        return None
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    node_list = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not node_list:
        raise JaxalignError("SLURM job without SLURM_STEP_NODELIST / SLURM_JOB_NODELIST: run under srun, or pass "
                            "--coordinator/--num-processes/--process-id")
    # Same port rule as jax's own SLURM detection, so every task computes the same address.
    port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
    local = None
    if ntasks > nodes:  # several tasks per node: one GPU each
        local = (int(env.get("SLURM_LOCALID", 0)),)
    return ProcessGroup("SLURM", f"{first_slurm_host(node_list)}:{port}", ntasks, int(env["SLURM_PROCID"]), local)


def _on_tpu_vm() -> bool:
    """TPU chips on the PCI bus (jax's own check), without starting a backend."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # a private helper: if it moves, fall back to "not a TPU VM"
        return False


# ----------------------------------------------------------------------------- agreement

_AGREE_BYTES = 4096  # one process's verdict: its error (cut to fit) and the values it must share


def agree(what: str, step, values: dict[str, str] | None = None) -> Any:
    """Run `step()` on every process, then make sure all of them succeeded and hold equal `values`.

    One collective (an all-gather of a small byte array per process), so a failure on any process (a
    bad file, a full disk on process 0) ends every process with the same error instead of leaving the
    others waiting in the job's next collective. `values` (name -> string, e.g. fingerprints) may be a
    callable of step's result. A single process runs `step` alone and lets its errors through as they are.
    """
    import jax

    if jax.process_count() == 1:
        result = step()
        if callable(values):
            values(result)
        return result
    import numpy as np
    from jax.experimental import multihost_utils

    result, error = None, ""
    try:
        result = step()
        shared = values(result) if callable(values) else (values or {})
    except JaxalignError as e:
        error, shared = str(e), {}
    except Exception as e:  # noqa: BLE001  (reported to every process, then raised as a JaxalignError)
        error, shared = f"{type(e).__name__}: {e}", {}
    mine = json.dumps({"error": error[:_AGREE_BYTES // 2], "values": shared}).encode()[:_AGREE_BYTES]
    buf = np.zeros(_AGREE_BYTES, np.uint8)
    buf[:len(mine)] = np.frombuffer(mine, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, _AGREE_BYTES)
    verdicts = [json.loads(bytes(row).rstrip(b"\0").decode(errors="replace")) for row in gathered]
    for i, v in enumerate(verdicts):
        if v["error"]:
            raise JaxalignError(f"{what} failed on process {i} of {len(verdicts)}: {v['error']}")
    for name in verdicts[0]["values"]:
        seen = [v["values"].get(name) for v in verdicts]
        if len(set(seen)) > 1:
            raise JaxalignError(
                f"{what}: the processes disagree on the {name} ("
                + ", ".join(f"process {i}: {s}" for i, s in enumerate(seen))
                + "); every process must see the same config, data files and checkpoints (a shared "
                "filesystem, or identical copies on every host)")
    return result

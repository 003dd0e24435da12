"""The elasticity drill: what a lost pod does to a running job, with the rendezvous the manifests render.

Two torchrun agents on 127.0.0.1 play worker-0 and worker-1 of a rendered job (Workers only, c10d
rendezvous hosted by worker-0's agent, min 1 / max 2 nodes, one process each), each through the real
docker/entrypoint.sh and launcher, as in a pod. The ranks (a stand-in module, below) form a real gloo group,
all-reduce once per step, and rank 0 checkpoints every few steps into a shared folder and resumes from the
last checkpoint at every (re)start, the way the trainer does.

Each agent is lost in turn, first by SIGTERM to its PID 1 (a pod deletion or preemption) and then by
SIGKILL to all of its processes (a node lost), and what k8s/gnpk8s/pytorchjob.py, the job specs and the
k8s/README.md claim is asserted:
  - worker-1 lost: worker-0's agent (the same process) re-forms the group alone and goes on training from
    the last checkpoint; the replacement worker-1 (what the operator recreates) joins again;
  - worker-0 lost (the c10d store lives in its agent): worker-1's agent ends at once with a retried status
    (200 or 201, under `restartPolicy: ExitCode`), and the recreated pair resumes from the last checkpoint;
  - at every restart, training resumes exactly at the last checkpoint written: no step is lost beyond it,
    and the step sequence has no gap.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
CKPT_EVERY = 5
DEADLINE_S = 300  # it takes about 75 s on a 2-core VM  # the whole drill; each wait below has its own, shorter bound

RANK_MODULE = """
import json, os, sys, time
import torch
import torch.distributed as dist

d = os.environ["DRILL_DIR"]
node = os.environ["DRILL_NODE"]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ck = os.path.join(d, "ckpt.json")
# The checkpoint carries the list of every checkpoint published so far: the record and the publication are
# one atomic rename, so a rank killed at any instant cannot leave a published checkpoint unrecorded.
saved = json.load(open(ck)) if os.path.exists(ck) else {"step": 0, "history": []}
step, history = saved["step"], saved["history"]

def log(name, text):
    with open(os.path.join(d, name), "a") as f:
        f.write(text + "\\n")

log("events", json.dumps({"start": step, "world": world, "rank": rank, "node": node, "t": time.time()}))
while not os.path.exists(os.path.join(d, "stop")):
    t = torch.ones(1)
    dist.all_reduce(t)  # a lost peer fails here
    step += 1
    if rank == 0:
        log("steps", json.dumps({"step": step, "world": int(t.item())}))
        if step % int(os.environ["DRILL_CKPT_EVERY"]) == 0:
            history.append({"step": step, "t": time.time()})
            with open(ck + ".tmp", "w") as f:
                json.dump({"step": step, "history": history}, f)
            os.replace(ck + ".tmp", ck)  # atomic, like the trainer's checkpoint
    time.sleep(0.05)
dist.barrier()
dist.destroy_process_group()
"""


def _rendered(job: str) -> tuple[dict[str, str], str]:
    """The literal env of job's rendered training container (Secret references left out) and the PET_NNODES
    the operator derives from its elasticPolicy ("min:max"): the drill's agents run with what the pods get."""
    from gnpk8s.pytorchjob import build
    from gnpk8s.spec import load_job

    pj = build(load_job(job, image="registry.test/gnp:drill"))
    container = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    ep = pj["spec"]["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d"  # the rendezvous the drill plays
    return {
        k: v for k, v in env.items() if not k.startswith(("GNP_", "NCCL_"))
    }, f"{ep['minReplicas']}:{ep['maxReplicas']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Drill:
    def __init__(self, tmp: Path, job: str) -> None:
        self.dir = tmp / "shared"
        self.dir.mkdir()
        (tmp / "mod").mkdir()
        (tmp / "mod" / "gnp_drill_rank.py").write_text(RANK_MODULE)
        self.tmp = tmp
        self.port = _free_port()
        self.agents: dict[int, subprocess.Popen] = {}
        self.pod_env, self.nnodes = _rendered(job)
        self.t0 = time.monotonic()

    def start(self, node: int) -> None:
        env = {
            **os.environ,
            "GNP_PYTHON": sys.executable,
            "GNP_MODULE": "gnp_drill_rank",
            "PYTHONPATH": f"{self.tmp / 'mod'}{os.pathsep}{ROOT}",
            "GNP_RETRY_CRASHES": "1",
            "OMP_NUM_THREADS": "1",
            "TMPDIR": str(self.tmp),
            "DRILL_DIR": str(self.dir),
            "DRILL_NODE": str(node),
            "DRILL_CKPT_EVERY": str(CKPT_EVERY),
            **self.pod_env,
            # what the training operator v1.9 sets for the rendered elasticPolicy (envvar_elastic.go):
            # PET_RDZV_ENDPOINT = <job>-worker-0:<port>, whose agent then hosts the c10d store
            "PET_NPROC_PER_NODE": "1",
            "PET_NNODES": self.nnodes,
            "PET_RDZV_BACKEND": "c10d",
            "PET_RDZV_ENDPOINT": f"127.0.0.1:{self.port}",
            "PET_RDZV_ID": "drill",
            "PET_MAX_RESTARTS": "10",
            # both agents share one host here: name the store's host explicitly (on a cluster, worker-0's
            # hostname matches the endpoint); a short last call keeps each re-rendezvous quick
            "PET_RDZV_CONF": f"is_host={'true' if node == 0 else 'false'},last_call_timeout=2,join_timeout=60",
        }
        log = open(self.tmp / f"agent{node}.log", "a")
        self.agents[node] = subprocess.Popen(
            [str(ENTRYPOINT), "train", "--recipe", "drill"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL of the group is a lost pod
        )
        log.close()

    def lines(self, name: str) -> list:
        path = self.dir / name
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def wait(self, what: str, cond, timeout: float = 90) -> None:
        end = min(time.monotonic() + timeout, self.t0 + DEADLINE_S)
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.2)
        raise AssertionError(f"drill: timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for p in sorted(self.tmp.glob("agent*.log")):
            out.append(f"--- {p.name} (last 30 lines)\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    def steps_at(self, world: int, after: int) -> int:
        return sum(1 for s in self.lines("steps")[after:] if s["world"] == world)

    def last_ckpt(self) -> int:
        ck = self.dir / "ckpt.json"
        return json.loads(ck.read_text())["step"] if ck.exists() else 0

    def ckpts(self) -> list[dict]:
        """Every checkpoint published so far ({"step", "t"}), read from the newest checkpoint itself."""
        ck = self.dir / "ckpt.json"
        return json.loads(ck.read_text())["history"] if ck.exists() else []

    def lose(self, node: int, how: str) -> int:
        """SIGTERM to the agent's PID 1 (then SIGKILL of what is left after a grace period), or SIGKILL of
        every process of the 'pod' at once. Returns the checkpoint step at that moment."""
        proc = self.agents[node]
        ckpt = self.last_ckpt()
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(30) == 143, f"worker-{node}'s entrypoint did not exit 143 on SIGTERM"
            finally:
                self._kill_group(proc)
        else:
            self._kill_group(proc)
            proc.wait(10)
        return ckpt

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for proc in self.agents.values():
            if proc.poll() is None:
                self._kill_group(proc)
                proc.wait(10)
            else:
                self._kill_group(proc)  # ranks left behind by an agent that exited


def _resumed_at_checkpoint(drill: Drill, n_events: int, ckpt: int) -> None:
    """The first group started after the loss resumed exactly at the newest checkpoint written before that
    start, and not before the one that existed when the node was lost: no step lost beyond the checkpoint."""
    new = [e for e in drill.lines("events")[n_events:] if e["rank"] == 0]
    assert new, "no restart recorded"
    newest = max([0] + [c["step"] for c in drill.ckpts() if c["t"] < new[0]["t"]])
    assert new[0]["start"] >= ckpt and new[0]["start"] == newest, (
        f"resumed at {new[0]['start']}; newest published checkpoint {newest}, {ckpt} at loss"
    )


@pytest.mark.slow
@pytest.mark.parametrize("job", ["vggbn-imagenet", "wideresnet-ss-cifar"])  # elastic 1-2 pods; fixed 2 pods
def test_losing_each_node_in_turn(tmp_path, job):
    drill = Drill(tmp_path, job)
    elastic = drill.nnodes == "1:2"
    assert elastic or drill.nnodes == "2:2"
    try:
        drill.start(0)
        time.sleep(1.0)  # worker-0's agent binds the store first, as the operator's worker-0 pod does
        drill.start(1)
        drill.wait("both nodes training", lambda: drill.steps_at(2, 0) >= 2 * CKPT_EVERY + 2)

        for how in ("SIGTERM", "SIGKILL"):
            # --- worker-1 lost: an elastic job's worker-0 goes on alone from the last checkpoint; a
            # fixed-size job's worker-0 waits (its agent stays up) for the recreated pod ---
            agent0 = drill.agents[0].pid
            n_steps, n_events = len(drill.lines("steps")), len(drill.lines("events"))
            ckpt = drill.lose(1, how)
            if elastic:
                drill.wait(
                    f"worker-0 alone after {how} to worker-1", lambda: drill.steps_at(1, n_steps) >= CKPT_EVERY + 2
                )
                _resumed_at_checkpoint(drill, n_events, ckpt)
            else:
                time.sleep(1)  # the survivor's collective fails at once
                stalled = len(drill.lines("steps"))
                time.sleep(8)
                assert len(drill.lines("steps")) == stalled, "a fixed-size job stepped with one node"
            assert drill.agents[0].poll() is None and drill.agents[0].pid == agent0, "worker-0's agent stopped"
            # --- the recreated worker-1 joins again ---
            n_steps = len(drill.lines("steps"))
            drill.start(1)
            drill.wait(f"worker-1 rejoined after {how}", lambda: drill.steps_at(2, n_steps) >= CKPT_EVERY + 2)
            if not elastic:
                _resumed_at_checkpoint(drill, n_events, ckpt)

            # --- worker-0 lost: the store goes with it; worker-1 ends with 200 at once ---
            n_events = len(drill.lines("events"))
            ckpt = drill.lose(0, how)
            t_lost = time.monotonic()
            code = drill.agents[1].wait(60)
            # 200 (rendezvous failure) or 201 (its rank's collective failed first): both retried (>= 128)
            assert code in (200, 201), (
                f"worker-1 exited {code}, not a retried status after {how} to worker-0\n{drill.logs()}"
            )
            took = time.monotonic() - t_lost
            assert took < 30, f"worker-1 took {took:.0f} s to give up on the lost rendezvous host"
            drill._kill_group(drill.agents[1])
            # --- the operator recreates both pods: the job resumes from the last checkpoint ---
            n_steps = len(drill.lines("steps"))
            drill.start(0)
            time.sleep(1.0)
            drill.start(1)
            drill.wait(f"job resumed after {how} to worker-0", lambda: drill.steps_at(2, n_steps) >= CKPT_EVERY + 2)
            _resumed_at_checkpoint(drill, n_events, ckpt)

        (drill.dir / "stop").write_text("")
        assert drill.agents[0].wait(60) == 0 and drill.agents[1].wait(60) == 0, drill.logs()
    finally:
        drill.close()

    # No gap: every step from 1 to the last was run (some twice: those after a checkpoint, redone after a
    # loss), and each (re)start began exactly at a checkpoint that had been written.
    steps = [s["step"] for s in drill.lines("steps")]
    assert set(steps) == set(range(1, max(steps) + 1))
    ckpts = {0} | {c["step"] for c in drill.ckpts()}
    starts = [e["start"] for e in drill.lines("events") if e["rank"] == 0]
    assert set(starts) <= ckpts, f"a group started at a step that was never checkpointed: {starts} vs {ckpts}"
    # redone work per loss is bounded by the checkpoint interval (plus the steps of the restart itself)
    assert len(steps) - max(steps) <= (len(starts) - 1) * (CKPT_EVERY + 20)

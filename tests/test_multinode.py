"""Multi-node, simulated on one machine with gloo: the README's own torchrun and sbatch commands.

Two "nodes" are two torchrun launches (`--nnodes 2 --node_rank 0/1`, rendezvous on 127.0.0.1)
that share the log and cache directories, as nodes share a cluster filesystem. Their commands
are the README's, with sizes and paths substituted (each substitution must apply: a README edit
that changes a command fails here instead of leaving it untested). Every rank runs
`tests/dist_run.py` (main.py plus recording callbacks) and writes `exit<rank>` when its main()
returned. Reference: the same experiment as one 2-process job on one node (Lightning's launcher).

    python -m pytest -q tests/test_multinode.py      # README, "Multi-node": the command per test
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CORPUS, tiny_config
from gptlab.cli import main
from gptlab.loading import consolidate_checkpoint, load_checkpoint
from gptlab.tasks import CausalLM

STEPS = 6
TIMEOUT = 480  # seconds for one job of 2 processes (healthy: ~1-2 min on a loaded 2-core machine)
TIMEOUT_4 = 900  # 2 x 2 processes
LOST_NODE_BOUND = 120  # seconds from killing node 1 to node 0's exit (README, "Multi-node")

# Added to every command: CPU, a few steps with validation and periodic saves in between, records.
COMMON = [
    "--trainer.accelerator", "cpu",
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", "3",
    "--preemption.every_n_steps", "2",
    "--trainer.callbacks+=dist_run.Recorder",
    "--trainer.callbacks+=dist_run.StepLog",
    "--throughput.peak_flops", "1e11",
]  # fmt: skip


def readme_block(after: str) -> str:
    """The first ```bash block of the README after the line containing `after`."""
    text = (REPO / "README.md").read_text()
    start = text.index("```bash\n", text.index(after)) + len("```bash\n")
    return text[start : text.index("```", start)]


def substituted(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the README's command no longer contains {old!r}: update this test with it"
        text = text.replace(old, new)
    return text


def readme_torchrun(
    node_rank: int | str, port: int | str, nproc: int, strategy: str, experiment: Path
) -> list[str]:
    """The README's torchrun command for one node, sized for this machine."""
    line = readme_block("torchrun (run on each node").replace("\\\n", " ")
    line = substituted(
        line,
        {
            "--nproc_per_node 8": f"--nproc_per_node {nproc}",
            "--trainer.devices 8": f"--trainer.devices {nproc}",
            "$NODE_RANK": str(node_rank),
            "$MASTER_ADDR": "127.0.0.1",
            "--master_port 29500": f"--master_port {port}",
            " main.py ": f" {REPO / 'tests' / 'dist_run.py'} ",
            "configs/pretrain/quickstart.yaml": str(experiment),
            "configs/trainer/ddp.yaml": f"configs/trainer/{strategy}.yaml",
            "/shared/logs": str(experiment.parent / "logs"),
            "/shared/cache": str(experiment.parent / "cache"),
        },
    )
    args = shlex.split(line)
    assert args[0] == "torchrun"
    return [sys.executable, "-m", "torch.distributed.run", *args[1:]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_launches: list[str] = []  # every launch's tag, for the cleanup after each test


def start(command: list[str], out: Path, log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in the repository root, its output into out/<log>.

    Every process it starts inherits GPTLAB_TEST_LAUNCH=out/<log>: torchrun starts its workers in
    sessions of their own, so a process group does not hold "every process of a node", this tag does.
    """
    out.mkdir(parents=True, exist_ok=True)
    tag = str(out / log)
    env = {
        **os.environ,
        "GPTLAB_TEST_OUT": str(out),
        "GPTLAB_TEST_LAUNCH": tag,
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    _launches.append(tag)
    with open(out / log, "w") as file:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=file, stderr=subprocess.STDOUT)
    proc.gptlab_tag = tag
    return proc


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL every process started by `proc`'s launch (kill -9 of a whole node), then reap it."""
    kill_tagged(proc.gptlab_tag)
    proc.wait()


def kill_tagged(tag: str) -> None:
    needle = f"GPTLAB_TEST_LAUNCH={tag}\0".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes():
                os.kill(int(environ.parent.name), signal.SIGKILL)
        except (OSError, ValueError):  # ended meanwhile, or not ours to read
            continue


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    while _launches:
        kill_tagged(_launches.pop())


def finish(procs: list[subprocess.Popen], out: Path, name: str, timeout: float) -> list[int]:
    """Exit statuses once every process ended; past `timeout` every process of every launch is killed."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            for other in procs:
                kill_launch(other)
            pytest.fail(f"{name}: no result within {timeout:.0f}s\n{tails(out)}")
    return codes


def tails(out: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-2500:]}" for log in sorted(out.glob("*.log")))


def assert_succeeded(codes: list[int], out: Path, ranks: int) -> list[dict]:
    """Every launcher exited 0 and every rank finished main(); the ranks' records."""
    assert codes == [0] * len(codes), tails(out)
    missing = [r for r in range(ranks) if not (out / f"exit{r}").is_file()]
    assert not missing, f"ranks {missing} did not finish\n{tails(out)}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def new_experiment(tmp: Path) -> Path:
    corpus = tmp / "corpus"
    corpus.mkdir(parents=True)
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    return tiny_config(tmp, corpus)


def two_nodes(experiment: Path, strategy: str, nproc: int = 1, *extra: str, name: str = "two_nodes") -> Path:
    """Both nodes' README torchrun commands, started together; returns the records folder."""
    out = experiment.parent / name
    port = free_port()
    procs = [
        start(
            [*readme_torchrun(rank, port, nproc, strategy, experiment), *COMMON, *extra],
            out,
            f"node{rank}.log",
        )
        for rank in range(2)
    ]
    return out, procs


def one_node(experiment: Path, strategy: str, nproc: int, *extra: str) -> Path:
    """The same experiment as one job of `nproc` processes on one node (Lightning's launcher)."""
    out = experiment.parent / "one_node"
    command = [
        sys.executable, str(REPO / "tests" / "dist_run.py"), "fit", "--config", str(experiment),
        "--config", f"configs/trainer/{strategy}.yaml", "--trainer.devices", str(nproc),
        "--logs_root", str(experiment.parent / "logs"),
        "--data.init_args.cache_dir", str(experiment.parent / "cache"), *COMMON, *extra,
    ]  # fmt: skip
    codes = finish([start(command, out, "node0.log")], out, "one node", TIMEOUT_4 if nproc > 2 else TIMEOUT)
    assert_succeeded(codes, out, nproc)
    return out


_baselines: dict[str, Path] = {}


def baseline(tmp_path_factory, strategy: str) -> Path:
    """The one-node 2-process run of `strategy`, made once per session (its experiment folder)."""
    if strategy not in _baselines:
        experiment = new_experiment(tmp_path_factory.mktemp(f"one_node_{strategy}"))
        one_node(experiment, strategy, 2)
        _baselines[strategy] = experiment
    return _baselines[strategy]


def records(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def last_checkpoint(experiment: Path) -> Path:
    return experiment.parent / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def run_layout(experiment: Path) -> list[str]:
    """Every path under the log root, with the parts that name a host, process or time generalized."""
    root = experiment.parent / "logs"
    paths = [str(p.relative_to(root)) for p in root.rglob("*")]
    paths = [re.sub(r"tfevents\..*", "tfevents.*", p) for p in paths]
    return sorted(re.sub(r"\.step-(\d+)-[0-9a-f]+", r".step-\1-*", p) for p in paths)


def assert_same_weights(experiment: Path, reference: Path, atol: float = 0.0) -> None:
    got = load_checkpoint(last_checkpoint(experiment))["state_dict"]
    expected = load_checkpoint(last_checkpoint(reference))["state_dict"]
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=atol, msg=key)


# ----------------------------------------------------------------------------- 0. options and launchers
@pytest.mark.slow
def test_readme_torchrun_command_reaches_gptlab_intact(capsys):
    """torchrun prefix-matches options after the script too: each of the README's arrives unchanged."""
    from torch.distributed.run import get_args_parser

    command = shlex.split(readme_block("torchrun (run on each node").replace("\\\n", " "))
    command = [{"$NODE_RANK": "0", "$MASTER_ADDR": "127.0.0.1"}.get(a, a) for a in command]
    script = command.index("main.py")
    parsed = get_args_parser().parse_args(command[1:])
    assert parsed.training_script == "main.py" and parsed.training_script_args == command[script + 1 :]
    with pytest.raises(SystemExit) as exit_:
        main([*command[script + 1 :], "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert (
        "logs: /shared/logs" in printed
        and "num_nodes: 2" in printed
        and "cache_dir: /shared/cache" in printed
    )


@pytest.mark.slow
def test_no_documented_option_is_taken_by_torchrun(capsys):
    """Every option `fit --help` lists passes torchrun's parser untouched, except the old `--logs`
    alias (torchrun reads it as its `--logs-specs`; `--logs_root` is the spelling to use)."""
    from torch.distributed.run import get_args_parser

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    # Option entries: "  --name VALUE, --alias VALUE   help..." (help text may mention others' options).
    entries = re.findall(r"^  (--\S.*?)(?:  |$)", capsys.readouterr().out, flags=re.M)
    options = sorted({o for entry in entries for o in re.findall(r"--[A-Za-z][\w.-]*", entry)})
    assert "--logs_root" in options and "--trainer.num_nodes" in options
    parser = get_args_parser()
    parser.exit_on_error = False  # an ambiguous or swallowed option raises instead of exiting
    taken = []
    for option in options:
        args = ["fit", option, "x"]
        try:
            parsed = parser.parse_args(["--nnodes", "1", "main.py", *args])
            if parsed.training_script_args != args:
                taken.append(option)
        except Exception:  # noqa: BLE001 - argparse's ArgumentError: torchrun refused it
            taken.append(option)
        except SystemExit:
            taken.append(option)
    assert taken == ["--logs"]


# ----------------------------------------------------------------------------- 1. two nodes, 2. shared cache
@pytest.fixture(scope="module")
def two_node_ddp(tmp_path_factory) -> Path:
    """Both README torchrun commands (DDP), started together on an empty shared cache."""
    experiment = new_experiment(tmp_path_factory.mktemp("two_node_ddp"))
    out, procs = two_nodes(experiment, "ddp")
    assert_succeeded(finish(procs, out, "two nodes (DDP)", TIMEOUT), out, 2)
    return experiment


def assert_same_as_one_node(experiment: Path, reference: Path) -> None:
    got, expected = records(experiment.parent / "two_nodes", 2), records(reference.parent / "one_node", 2)
    for rank, (record, one) in enumerate(zip(got, expected, strict=True)):
        assert record["cluster_environment"] == "TorchElasticEnvironment"
        assert record["ranks"] == [rank, 0, rank]  # global, local, node
        assert one["ranks"] == [rank, rank, 0]
        assert record["world_size"] == one["world_size"] == 2
        # Same seed and global batch: the same batches on the same ranks, bit for bit.
        assert len(record["losses"]) == STEPS and record["losses"] == one["losses"]
    assert_same_weights(experiment, reference)
    # One run directory, written by global rank 0, with the files a one-node run has.
    assert run_layout(experiment) == run_layout(reference)
    assert (experiment.parent / "logs" / "tiny" / "version_0" / "tokenizer").is_dir()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_ddp_equal_one_node(two_node_ddp: Path, tmp_path_factory):
    assert_same_as_one_node(two_node_ddp, baseline(tmp_path_factory, "ddp"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_fsdp_equal_one_node(tmp_path_factory):
    experiment = new_experiment(tmp_path_factory.mktemp("two_node_fsdp"))
    out, procs = two_nodes(experiment, "fsdp")
    assert_succeeded(finish(procs, out, "two nodes (FSDP)", TIMEOUT), out, 2)
    assert last_checkpoint(experiment).is_dir()  # sharded: each node wrote its shard into the one run
    assert_same_as_one_node(experiment, baseline(tmp_path_factory, "fsdp"))


@pytest.mark.slow
@pytest.mark.distributed
def test_shared_empty_cache_is_prepared_once(two_node_ddp: Path):
    # Both nodes ran prepare_data on the same empty cache at the same time: one trained the
    # tokenizer and tokenized the text, the other waited for its claim and found them cached.
    builds = (two_node_ddp.parent / "builds.txt").read_text().split()
    assert sorted(builds[::2]) == ["tokenize", "tokenizer"], builds
    cache = two_node_ddp.parent / "cache"
    assert len(list((cache / "tokenizers").iterdir())) == 1
    assert len(list((cache / "text").iterdir())) == 1
    assert not list(cache.rglob(".tmp-*")) and not list(cache.rglob("*.claim*"))
    # At most one node waited for the other's claim: under load the second node may reach
    # prepare_data only after the first has finished, and then it finds the cache complete
    # (tests/test_data_cache.py makes the overlap certain).
    logs = [(two_node_ddp.parent / "two_nodes" / f"node{r}.log").read_text() for r in range(2)]
    assert sum("waiting for another process to prepare" in log for log in logs) <= 1


# ----------------------------------------------------------------------------- 3. a lost node
@pytest.mark.slow
@pytest.mark.distributed
def test_lost_node_fails_both_and_resumes_exactly(two_node_ddp: Path, tmp_path_factory):
    experiment = new_experiment(tmp_path_factory.mktemp("lost_node"))
    # `--ckpt_path last` from the first launch on, as in the sbatch script: nothing to resume
    # starts fresh, so the same two commands serve the first job and the restarted one.
    # The documented bound on a silent node (here the lost node's connections close: sooner).
    extra = ["--ckpt_path", "last", "--trainer.strategy.init_args.timeout", "0:02:00"]
    extra += ["--trainer.callbacks+=dist_run.Stall", "--trainer.callbacks.init_args.step", "3"]
    out, procs = two_nodes(experiment, "ddp", 1, *extra, name="first")
    stalled = experiment.parent / "stalled1"
    deadline = time.monotonic() + TIMEOUT
    while not stalled.exists():  # rank 1 finished step 3 (after the periodic save at step 2)
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for proc in procs:
                kill_launch(proc)
            pytest.fail(f"rank 1 never reached step 3\n{tails(out)}")
        time.sleep(0.2)
    assert torch.load(last_checkpoint(experiment), weights_only=True)["global_step"] == 2
    kill_launch(procs[1])  # kill -9 of every process of node 1: its torchrun agent and its rank
    killed = time.monotonic()
    codes = finish(procs[:1], out, "node 0 after node 1 was lost", LOST_NODE_BOUND)
    failed_after = time.monotonic() - killed
    assert codes[0] != 0 and failed_after < LOST_NODE_BOUND, tails(out)
    print(f"node 0 failed {failed_after:.1f}s after node 1 was killed")  # shown with pytest -s
    assert not (out / "exit0").exists()

    out, procs = two_nodes(experiment, "ddp", 1, *extra, name="resumed")
    assert_succeeded(finish(procs, out, "resumed", TIMEOUT), out, 2)
    # Resumed from the save at step 2 into the same run directory, and ended bit for bit where
    # the uninterrupted two-node run ended.
    steps = [json.loads(line) for line in (out / "steps0.jsonl").read_text().splitlines()]
    reference = [
        json.loads(line)
        for line in (two_node_ddp.parent / "two_nodes" / "steps0.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in steps] == list(range(3, STEPS + 1))
    assert steps == reference[2:]
    assert_same_weights(experiment, two_node_ddp)
    assert len(list((experiment.parent / "logs" / "tiny").iterdir())) == 1


# ----------------------------------------------------------------------------- 4. SLURM
FAKE_SRUN = """#!{python}
# srun, as far as a job step of `ntasks-per-node` tasks on each node needs: one process per task
# with the variables srun sets (https://slurm.schedmd.com/srun.html#SECTION_OUTPUT-ENVIRONMENT-VARIABLES).
import os, subprocess, sys
nodes, per_node = int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NTASKS_PER_NODE"])
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_NTASKS=str(nodes * per_node), SLURM_PROCID=str(node * per_node + local),
                   SLURM_LOCALID=str(local), SLURM_NODEID=str(node))
        procs.append(subprocess.Popen(sys.argv[1:], env=env))
sys.exit(max(abs(p.wait()) for p in procs))
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_sbatch_script_under_slurm_variables(tmp_path_factory):
    experiment = new_experiment(tmp_path_factory.mktemp("slurm"))
    script = substituted(
        readme_block("SLURM (`sbatch"),
        {
            "--ntasks-per-node=8": "--ntasks-per-node=1",
            "--trainer.devices 8": "--trainer.devices 1",
            "python main.py": f"{sys.executable} {REPO / 'tests' / 'dist_run.py'}",
            "configs/pretrain/quickstart.yaml": str(experiment),
            "/shared/logs": str(experiment.parent / "logs"),
            "/shared/cache": str(experiment.parent / "cache"),
            "--ckpt_path last\n": f"--ckpt_path last {shlex.join(COMMON)}\n",
        },
    )
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script, flags=re.M))
    bin_dir = experiment.parent / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    (experiment.parent / "train.sbatch").write_text(script)
    # What sbatch sets from the #SBATCH lines, with this machine as every node.
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train.sbatch",
        "SLURM_NNODES": sbatch["nodes"],
        "SLURM_NTASKS_PER_NODE": sbatch["ntasks-per-node"],
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_PORT": str(free_port()),  # else derived from the job id: may be taken here
    }
    out = experiment.parent / "slurm"
    proc = start(["bash", str(experiment.parent / "train.sbatch")], out, "job.log", env)
    got = assert_succeeded(finish([proc], out, "sbatch", TIMEOUT), out, 2)
    expected = records(baseline(tmp_path_factory, "fsdp").parent / "one_node", 2)
    for rank, (record, one) in enumerate(zip(got, expected, strict=True)):
        assert record["cluster_environment"] == "SLURMEnvironment"
        assert record["ranks"] == [rank, 0, rank]
        assert record["strategy"] == "FSDP" and record["losses"] == one["losses"]


# ----------------------------------------------------------------------------- 5. HSDP
@pytest.mark.slow
@pytest.mark.distributed
def test_hybrid_sharding_equals_fsdp_and_reads_anywhere(tmp_path_factory):
    hybrid = new_experiment(tmp_path_factory.mktemp("hsdp"))
    out, procs = two_nodes(hybrid, "fsdp", 2, "--trainer.strategy.init_args.hybrid_sharding", "true")
    got = assert_succeeded(finish(procs, out, "HSDP (2 x 2)", TIMEOUT_4), out, 4)
    plain = new_experiment(tmp_path_factory.mktemp("fsdp4"))
    expected = records(one_node(plain, "fsdp", 4), 4)
    for record, one in zip(got, expected, strict=True):
        # Replicated across the 2 nodes, sharded over the 2 processes of each; plain FSDP: 4 shards.
        assert record["mesh"] == [2, 2] and record["placements"] == ["R", "S(0)"]
        assert one["mesh"] == [4] and one["placements"] == ["S(0)"]
        torch.testing.assert_close(record["losses"], one["losses"], rtol=0, atol=1e-5)
    # The sharded checkpoint reads like plain FSDP's: consolidated on one device, also in Python.
    assert last_checkpoint(hybrid).is_dir()
    assert_same_weights(hybrid, plain, atol=1e-5)
    state = consolidate_checkpoint(last_checkpoint(hybrid))["state_dict"]
    model = CausalLM.load_from_checkpoint(last_checkpoint(hybrid))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

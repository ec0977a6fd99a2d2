"""Every command the docs show in a ```bash block runs, as a user would copy it, so that no example in the docs can be
rejected by the code.

The commands run from a workspace laid out like a user's checkout (``configs/``, ``launchers/``, ``bench/`` and
``docker/`` of this repository; ``runs/beit_proxy``, ``runs/maskfeat_proxy`` and ``runs/demo_cpu`` holding a tiny
trained run; PascalVOC and ADE20K trees under ``VOC2012/`` and ``ADE/``). What a test may change is limited to
placeholders and sizes: absolute paths of data the docs assume (``/datasets/...``, ``/data/...``, ``/weights/...``)
point at the demo set and the workspace, and sizes shrink (fewer processes, epochs, iterations, images; the micro
model at 32 px; training commands get ``SHRINK`` appended). Each command is matched by exactly one rule, which says
how it runs; a command no rule knows fails ``test_every_documented_command_has_a_way_to_run``, so a new example in the
docs needs a rule here. The exceptions and why: submissions to SLURM run with ``--dry-run`` (the journeys in
tests/slurm submit for real); Docker, Enroot and Apptainer commands (none runs here) are skipped with the reason, the
podman commands are tests/container's; the two quick-start commands are the journey test's and ``.ci/run``'s own;
the learning run and the scaling benchmark are their own tests' (tests/test_reproduce_small.py, test_bench_scaling.py),
which check what they print.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, train_in_process

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Command:
    source: str
    """file:line, for messages"""
    text: str
    """as documented, continuation lines joined and the trailing comment dropped"""

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def documented_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        inside, pending, first = False, "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                inside = not inside and line.strip() in ("```bash", "```sh")
                continue
            if not inside or not (pending or line.strip()) or line.lstrip().startswith("#") and not pending:
                continue
            first = first if pending else number
            pending += " " + line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            lexer = shlex.shlex(pending, posix=True, punctuation_chars=False)
            lexer.whitespace_split, lexer.commenters = True, "#"
            commands.append(Command(f"{doc.relative_to(REPO)}:{first}", shlex.join(list(lexer))))
            pending = ""
    return commands


SHRINK = ["model.size=micro", "model.img_size=32", "optim.global_batch=16", "optim.micro_batch=8", "optim.epochs=1",
          "optim.warmup_epochs=0", "data.num_workers=0", "log.every_steps=1", "data.demo_images=64"]
"""training commands: the micro model for one epoch of one batch per rank and step"""
SMALLER_FLAGS = {"--nproc": "2", "--nproc_per_node": "2", "--rounds": "1", "--steps": "1", "--eval-every": "1"}
"""flags whose documented value shrinks in place"""
SMALLER_OVERRIDES = {"model.size": "micro", "data.samples_per_epoch": "64"}
SIZES = {
    "linear": "--block 2 --epochs 2 --warmup-epochs 1 --batch-size 16",
    "seg": "--block 2 --epochs 1 --batch-size 8",
    "finetune": "--epochs 2 --warmup-epochs 1 --batch-size 16",
    "upernet": "--iters 2 --warmup-iters 1 --batch-size 4 --crop-size 32",
    "attention": "--layer 1 --images 4 --query 1,1",
    "bench/step.py": "--sizes micro --img 32 --batch 4 --warmup 1 --rounds 1 --steps 1",
}
"""flags appended to an evaluation protocol's or a benchmark's command (the last value of a flag wins): the tiny
run's depth 4 and the demo's 64 images"""


@dataclass
class Workspace:
    root: Path
    demo: Path
    weights: Path
    tag: str

    def placeholders(self) -> dict[str, str]:
        """Longest first: a prefix must not shadow a longer placeholder."""
        shards = str(self.demo / "shards" / "train-{000000..000007}.tar")
        table = {"/data/in1k_train.beton": str(self.demo / "train.beton"),
                 "/data/laion/{00000..00099}.tar": shards, "/data/laion/{00000..12345}.tar": shards,
                 "/datasets/imagenet": str(self.demo), "/datasets/ffcv/": f"{self.root}/ffcv/",
                 "/datasets/VOCdevkit/VOC2012": str(self.root / "VOC2012"),
                 "/datasets/ADEChallengeData2016": str(self.root / "ADE"), "/weights/encoder.pkl": str(self.weights),
                 "/shared/smim_dist.sif": str(self.root / "smim_dist.sif"), "step_00150000": self.tag}
        return dict(sorted(table.items(), key=lambda item: -len(item[0])))

    def adapt(self, argv: list[str], training: bool = False) -> list[str]:
        """Placeholders replaced and sizes shrunk; training commands also read the demo set (its FFCV file or its
        shards) and write a run directory of their own."""
        out = []
        for token in argv:
            for placeholder, real in self.placeholders().items():
                token = token.replace(placeholder, real)
            key, sep, _ = token.partition("=")
            if sep and key in SMALLER_OVERRIDES:
                token = f"{key}={SMALLER_OVERRIDES[key]}"
            if out and out[-1] in SMALLER_FLAGS:
                token = SMALLER_FLAGS[out[-1]]
            out.append(token)
        out += next((SIZES[name].split() for name in argv if name in SIZES), [])
        if training:
            demo_config = any("demo_cpu" in token for token in argv)
            data = [f"data.path={self.demo}"] if demo_config else [f"data.path={self.demo / 'train.beton'}"]
            if "data.demo_scenes=layouts" in argv:  # its own demo folder: the shared one holds the shapes
                data = [f"data.path={self.root / 'layouts'}"]
            if any("webdataset" in token for token in argv):
                data = [f"data.path={self.placeholders()['/data/laion/{00000..00099}.tar']}"]
            tokenizer = [] if any("tokenizer_path" in t for t in argv) else [f"target.tokenizer_path={self.weights}",
                                                                               "target.trust_pickle=true"]
            output = self.root / "trained" / re.sub(r"\W+", "_", shlex.join(argv))[:120]
            out += [*SHRINK, *data, *tokenizer, f"output_dir={output}"]
        return out


def run(argv: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    executable = argv[0]
    if executable == "python":
        argv = [sys.executable, *argv[1:]]
    elif (BIN / executable).exists():
        argv = [str(BIN / executable), *argv[1:]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{shlex.join(argv)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def in_process(main: Callable[[list[str]], int], argv: list[str], cwd: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.chdir(cwd):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    assert code == 0, f"{shlex.join(argv)} exited {code}\n{out.getvalue()[-5000:]}"
    return out.getvalue()


def run_training(command: Command, ws: Workspace) -> None:
    """``smim-train`` in this process, as tests/test_train.py runs it (its paths are absolute once adapted); the
    launchers start their processes."""
    argv = ws.adapt(command.argv, training=True)
    if argv[0] == "smim-train":
        train_in_process(argv[1:])
    else:
        run(argv, ws.root)


def run_cli(command: Command, ws: Workspace) -> None:
    from smim_dist.data.convert_cli import main as convert
    from smim_dist.eval.cli import main as evaluate
    from smim_dist.export import main as export
    from smim_dist.status_cli import main as status

    argv = ws.adapt(command.argv)
    main = {"smim-eval": evaluate, "smim-export": export, "smim-convert": convert, "smim-status": status}[argv[0]]
    in_process(main, argv[1:], ws.root)


SLURM_ONLY_OPTIONS = {"--tasks", "--cpus-per-task", "--time", "--partition", "--array-parallelism", "--setup"}


def convert_here_instead_of_slurm(command: Command, ws: Workspace) -> None:
    """A conversion submitted as a SLURM job array runs here as one local task writing the same folder, which the
    next commands read (the job array itself is tests/slurm/test_convert_array.py's)."""
    from smim_dist.data.convert_cli import main as convert

    argv, local = ws.adapt(command.argv), []
    for previous, token in zip(["", *argv], argv):
        if token != "--slurm" and token not in SLURM_ONLY_OPTIONS and previous not in SLURM_ONLY_OPTIONS:
            local.append(token)
    in_process(convert, local[1:], ws.root)


def run_slurm_launcher(command: Command, ws: Workspace) -> None:
    """On a machine with SLURM too: a dry run checks everything a submission would but sbatch's acceptance. Its runs
    go to a folder of their own (runs/ holds the evaluation commands' tiny runs under the paper configs' names)."""
    argv = ws.adapt(command.argv)
    run([*argv, *([] if "--dry-run" in argv else ["--dry-run"]), f"output_dir={ws.root / 'submitted'}"], ws.root)


def run_node_pair(command: Command, ws: Workspace) -> None:
    """Two machines' launchers, both on this one: node 0 at 127.0.0.1 (static ranks) or a rendezvous there."""
    argv = [token.replace("10.0.0.1", "127.0.0.1") for token in ws.adapt(command.argv, training=True)]
    argv[argv.index("--nproc") + 1] = "1"
    if "--node-rank" in argv:
        ranks = [argv, [("1" if previous == "--node-rank" else token) for previous, token in zip(["", *argv], argv)]]
    else:
        ranks = [argv, argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, *node[1:]], cwd=ws.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in ranks]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(out[-3000:] for out in outputs)


def covered_by_the_journey(command: Command, ws: Workspace) -> None:
    from test_journeys import DEMO_COMMAND

    assert command.text == DEMO_COMMAND, "tests/test_journeys.py runs the quick start's demo command"


def covered_by_the_learning_test(command: Command, ws: Workspace) -> None:
    from test_reproduce_small import LEARNING_RUN

    assert command.argv[1:] == LEARNING_RUN[:1], "tests/test_reproduce_small.py runs the experiment at its smallest"


def covered_by_the_scaling_test(command: Command, ws: Workspace) -> None:
    from test_bench_scaling import DOCUMENTED

    assert command.argv[1:] == DOCUMENTED, "tests/test_bench_scaling.py runs it, shrunk, and checks its report"


def run_by_ci(command: Command, ws: Workspace) -> None:
    assert command.text in (REPO / ".ci" / "run").read_text(), ".ci/run runs the quick start's test command"


def needs_a_container_engine(command: Command, ws: Workspace) -> None:
    pytest.skip("no Docker engine, Enroot or Apptainer on this machine; the image is built and run with podman by "
                "tests/container, which runs the podman commands of docs/launching.md")


def covered_by_the_container_test(command: Command, ws: Workspace) -> None:
    from container.test_image import PAGE

    assert command.source.startswith(PAGE + ":"), f"tests/container/test_image.py runs the podman commands of {PAGE}"


def needs_a_gpu(command: Command, ws: Workspace) -> None:
    if not shutil.which("nvidia-smi"):
        pytest.skip("a GPU benchmark (bf16, torch.compile): bench/gpu_check.sh runs it on a GPU machine")
    run(ws.adapt(command.argv), ws.root)


RULES: list[tuple[str, Callable[[Command, Workspace], None]]] = [
    (r"bash launchers/quickstart\.sh demo", covered_by_the_journey),
    (r"bash launchers/quickstart\.sh test", run_by_ci),
    (r"(smim-train|torchrun .*-m smim_dist\.train) .*", run_training),
    (r"python launchers/local\.py --nproc .*", run_training),
    (r"python launchers/local\.py --nnodes 2 --node-rank 1 .*", lambda command, ws: pytest.skip(
        "runs with its node 0 (the --node-rank 0 command) as one pair")),
    (r"python launchers/local\.py --nnodes 2 (--node-rank 0|--rdzv-endpoint) .*", run_node_pair),
    (r"python launchers/slurm\.py .*", run_slurm_launcher),
    (r"smim-(eval|export|status) .*|smim-convert (?!.* --slurm).*", run_cli),
    (r"smim-convert .* --slurm( .*)?", convert_here_instead_of_slurm),
    (r"torchrun --nproc_per_node \d+ -m smim_dist\.eval\.cli .*", lambda command, ws: run(ws.adapt(command.argv),
                                                                                             ws.root)),
    (r"(docker|apptainer|enroot) .*", needs_a_container_engine),
    (r"podman .*|mkdir -p runs data_cache", covered_by_the_container_test),
    (r"python bench/step\.py .*--dtype bf16.*", needs_a_gpu),
    (r"python bench/reproduce_small\.py", covered_by_the_learning_test),
    (r"python bench/scaling\.py .*", covered_by_the_scaling_test),
    (r"python bench/(?!reproduce_small|scaling)\w+\.py(?!.*--dtype bf16)( .*)?",
     lambda command, ws: run(ws.adapt(command.argv), ws.root)),
]


def rule_for(command: Command) -> Callable[[Command, Workspace], None]:
    matches = [how for pattern, how in RULES if re.fullmatch(pattern, command.text)]
    assert len(matches) == 1, f"{command.source}: `{command.text}` matches {len(matches)} rules of tests/test_docs.py"
    return matches[0]


COMMANDS = documented_commands()
DISTINCT = [command for i, command in enumerate(COMMANDS) if command.text not in {c.text for c in COMMANDS[:i]}]
"""each command text run once, where it first appears: the README repeats a few of the docs pages' commands"""


def test_every_documented_command_has_a_way_to_run():
    assert len(COMMANDS) > 20, "the extraction found the docs' commands"
    for command in COMMANDS:
        rule_for(command)
        assert "..." not in command.text, f"{command.source}: `{command.text}` cannot be copied as it is"


def local_links(doc: Path) -> list[str]:
    """The targets of a page's markdown links to files of this repository, anchors dropped."""
    targets = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
    return [target.partition("#")[0] for target in targets if not re.match(r"[a-z]+:|#", target)]


def test_the_readme_is_short_and_indexes_every_docs_page():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 200, "README.md is the overview: reference goes to docs/"
    assert {f"docs/{page.name}" for page in DOCS[1:]} <= set(local_links(readme)), "README's Docs index misses a page"
    for doc in DOCS:
        for target in local_links(doc):
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links {target}, which does not exist"


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory, tiny_run, demo_data) -> Path:
    """What the commands read and never change: PascalVOC and ADE20K trees (from the demo set the tiny run built),
    DALL-E weights, an image file."""
    from test_dalle import dall_e_encoder
    from test_linear_seg import voc_tree
    from test_upernet import ade_tree

    import torch

    root = tmp_path_factory.mktemp("shared_data")
    voc_tree(root / "VOC2012", demo_data)
    ade_tree(root / "ADE", demo_data)
    torch.manual_seed(0)
    (root / "weights").mkdir()
    encoder = dall_e_encoder.Encoder(device=torch.device("cpu"), requires_grad=False)
    torch.save(encoder, root / "weights" / "encoder.pkl")
    (root / "smim_dist.sif").write_bytes(b"")
    return root


@pytest.fixture
def workspace(tmp_path, shared_data, tiny_run, demo_data) -> Workspace:
    """A user's checkout for one command: its own copies of the runs it may write into."""
    for folder in ("configs", "launchers", "bench", "docker"):
        (tmp_path / folder).symlink_to(REPO / folder)
    for folder in ("VOC2012", "ADE", "weights", "smim_dist.sif"):
        (tmp_path / folder).symlink_to(shared_data / folder)
    for name in ("beit_proxy", "maskfeat_proxy", "demo_cpu"):
        shutil.copytree(tiny_run, tmp_path / "runs" / name, symlinks=True)
    (tmp_path / "ffcv").mkdir()
    tag = (tiny_run / "checkpoints" / "latest").read_text().strip()
    return Workspace(root=tmp_path, demo=demo_data, weights=tmp_path / "weights" / "encoder.pkl", tag=tag)


@pytest.mark.e2e
@pytest.mark.parametrize("command", DISTINCT, ids=[f"{c.source}" for c in DISTINCT])
def test_the_documented_command_runs(command, workspace):
    rule_for(command)(command, workspace)

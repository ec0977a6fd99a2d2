"""Tasks of a SLURM job inside a container image (pyxis / enroot or Apptainer): srun's arguments, and the paths that
must name the same places inside the image as on the submitting machine."""

from __future__ import annotations

from pathlib import Path

from smim_dist.config import Config

CONTAINER_WORKDIR = "/opt/smim_dist"
"""where the project lives in the image (docker/Dockerfile)"""
CONTAINER_PYTHON = "/opt/smim_dist/docker/entrypoint.sh python"
"""the image's python, through its entrypoint (its PATH and caches; pyxis and apptainer exec skip the entrypoint)"""


def enroot_image_hint(image: str) -> str | None:
    """pyxis passes the image to enroot, whose references are ``docker://[USER@][REGISTRY#]IMAGE[:TAG]``: a
    registry host written with '/' would be taken as a Docker Hub repository."""
    reference = image.removeprefix("docker://")
    first, slash, rest = reference.partition("/")
    if "#" in reference or not slash or not ("." in first or ":" in first or first == "localhost"):
        return None
    return f"docker://{first}#{rest}"


def local_path(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:") and not any(c in path for c in ", \t\n")


def read_paths(cfg: Config) -> dict[str, Path]:
    """The local files and folders the run reads, by config key."""
    values = {"data.path": cfg.data.path, "target.tokenizer_path": cfg.target.tokenizer_path,
              "eval.config_dir": cfg.eval.config_dir}
    return {key: Path(value) for key, value in values.items() if value and local_path(value)}


def container_overrides(cfg: Config) -> list[str]:
    """The output path and every path the run reads made absolute, so that they name the same mounted places inside
    the image."""
    return [f"output_dir={Path(cfg.output_dir).absolute()}",
            *(f"{key}={path.absolute()}" for key, path in read_paths(cfg).items())]


def container_args(image: str | None, runtime: str, extra_mounts: str | None, workdir: str | None, gpus: bool,
                   cfg: Config) -> list[str]:
    """srun's arguments that put each task in the image: pyxis's flags, or apptainer's command before the task's."""
    if not image:
        return []
    folders = [path if path.is_dir() else path.parent for path in read_paths(cfg).values()]
    mounts = [f"{path}:{path}" for path in dict.fromkeys(map(str, [cfg.output_dir, *folders]))]
    mounts = ",".join(mount for mount in mounts + (extra_mounts or "").split(",") if mount)
    image = str(Path(image).absolute()) if Path(image).is_file() else image
    workdir = workdir or CONTAINER_WORKDIR
    if runtime == "pyxis":
        return [f"--container-image={image}", f"--container-mounts={mounts}", f"--container-workdir={workdir}"]
    return ["apptainer", "exec", *(["--nv"] if gpus else []), "--bind", mounts, "--pwd", workdir, image]

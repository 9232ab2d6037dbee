"""deploy/: the KubeRay RayJob's entrypoint is a study sslab accepts, with options it knows, and the
image it names is the one deploy/Dockerfile builds (neither is applied here: no Kubernetes)."""

import shlex

import yaml

from conftest import REPO
from sslab.platform.cli import build_parser, main


def test_the_rayjob_runs_a_study_sslab_accepts(monkeypatch, capsys):
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["sslab", "run"]
    args = build_parser().parse_args(argv[1:])  # every option is one `sslab run` has
    assert args.tracking_uri.startswith("http://") and args.workdir.startswith("/mnt/")
    monkeypatch.chdir(REPO)  # the image's working directory is the repository
    sets = [part for name in args.set for part in ("--set", name)]
    assert main(["validate", args.study, *sets, "--no-estimate"]) == 0, capsys.readouterr().err
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert images == {"REGISTRY/sslab:latest"} and "-t REGISTRY/sslab:latest" in dockerfile
    ray_version = cluster["rayVersion"]
    assert f"FROM rayproject/ray:{ray_version}-py311" in dockerfile

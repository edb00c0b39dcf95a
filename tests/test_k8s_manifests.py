"""Rendered Jobs, cluster set-up manifests and container images, checked without a cluster.

Structure: kubernetes-validate's JSON schemas (strict, so a misspelt field fails). Values the schemas
leave open (names, quantities, label values) and the InPars contract (shards, retries, failure
policy, secrets by reference, Kueue) are asserted here.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from inpars.config import PipelineConfig, ResourcesConfig  # noqa: E402
from inpars.errors import EXIT_PERMANENT, ConfigError  # noqa: E402
from inpars.launch.accelerators import GPU_TYPES, tpu_slice  # noqa: E402
from inpars.launch.k8s_manifests import (  # noqa: E402
    QUEUE_LABEL,
    dry_run,
    image_for,
    job_name,
    render_examples,
    render_job,
    render_stage,
    run_label,
    validate_manifest,
)
from inpars.launch.kueue import QueueView, check_admission  # noqa: E402
from inpars.launch.plan import SECRET_NAME, StageJob, plan_pipeline  # noqa: E402
from inpars.shards import (  # noqa: E402
    SHARD_COUNT_ENV,
    SHARD_INDEXES_ENV,
    host_from_env,
    shard_count_from_env,
    shard_index_from_env,
)

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["1.30.0", "1.35.0", kubernetes_validate.latest_version()]
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SENTINEL_KEY = "sk-test-DO-NOT-LEAK-0123456789"


def variant(name: str) -> PipelineConfig:
    cfg = PipelineConfig().override({"generate.shards": 4, "negatives.shards": 2, "rerank.shards": 3})
    if name == "gpu":
        for stage in ("generate", "train", "rerank"):
            cfg.resources[stage] = ResourcesConfig(cpu="8", memory="32Gi", gpu=1, gpu_type="nvidia-l4")
    elif name == "tpu":
        cfg.resources["train"] = ResourcesConfig(cpu="8", memory="64Gi", tpu_type="tpu-v5-lite-podslice", tpu_topology="2x2")
    elif name == "openai":
        cfg = cfg.override({"generate.backend": "openai", "generate.model": "gpt-4o-mini"})
    elif name == "publish":
        cfg = cfg.override({"publish.destination": "gs://bucket/published"})
    return cfg


def render_all(name: str, **kw) -> list[dict]:
    jobs = plan_pipeline(variant(name), "gs://bucket/ws/runs/r-1")
    return [render_job(job, run_id="r-1", namespace="inpars", image="ghcr.io/inpars/inpars:cpu", **kw) for job in jobs]


def container(manifest: dict) -> dict:
    [c] = manifest["spec"]["template"]["spec"]["containers"]
    return c


def env_of(manifest: dict) -> dict:
    return {e["name"]: e for e in container(manifest)["env"]}


@pytest.mark.parametrize("name", ["default", "gpu", "tpu", "openai", "publish"])
def test_every_stage_validates_against_the_schemas(name):
    manifests = render_all(name, queue="inpars")
    assert len(manifests) >= 6
    for m in manifests:
        for version in VERSIONS:
            kubernetes_validate.validate(m, version, strict=True)
        validate_manifest(m)
        assert m["metadata"]["namespace"] == "inpars"
        assert DNS1123.match(m["metadata"]["name"]) and len(m["metadata"]["name"]) <= 63


def test_the_job_contract():
    for m in render_all("default"):
        spec = m["spec"]
        stage = m["metadata"]["labels"]["inpars.io/stage"]
        shards = {"generate": 4, "negatives": 2, "rerank": 3}.get(stage, 1)
        assert m["apiVersion"] == "batch/v1" and m["kind"] == "Job"
        assert spec["completionMode"] == "Indexed" and spec["completions"] == shards
        assert 1 <= spec["parallelism"] <= shards
        assert spec["backoffLimitPerIndex"] == 3 and 1 <= spec["maxFailedIndexes"] <= shards
        assert "backoffLimit" not in spec
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["ttlSecondsAfterFinished"] == 86400
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        assert spec["template"]["spec"]["serviceAccountName"] == "inpars-runner"
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert rules[1]["action"] == "FailIndex"
        assert rules[1]["onExitCodes"] == {"containerName": "worker", "operator": "In", "values": [EXIT_PERMANENT]}
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "inpars" and labels["inpars.io/run-id"] == "r-1"
        assert spec["template"]["metadata"]["labels"]["inpars.io/stage"] == stage  # pods are findable too
        assert QUEUE_LABEL not in labels and "suspend" not in spec
        c = container(m)
        assert c["command"] == ["inpars", "worker", stage, "--run", "gs://bucket/ws/runs/r-1"]
        assert c["resources"]["requests"] == c["resources"]["limits"]
        assert env_of(m)[SHARD_COUNT_ENV]["value"] == str(shards) and SHARD_INDEXES_ENV not in env_of(m)
        assert env_of(m)["HF_HOME"]["value"].startswith("/scratch") if stage != "evaluate" else True
        assert c["image"] == "ghcr.io/inpars/inpars:cpu"
        assert "nodeSelector" not in spec["template"]["spec"]


def test_kueue_label_suspends_the_job():
    for m in render_all("default", queue="team-a"):
        assert m["metadata"]["labels"][QUEUE_LABEL] == "team-a"
        assert m["spec"]["suspend"] is True
        assert QUEUE_LABEL not in m["spec"]["template"]["metadata"]["labels"]


def test_gpu_resources_selectors_and_image():
    by_stage = {m["metadata"]["labels"]["inpars.io/stage"]: m for m in render_all("gpu")}
    for stage in ("generate", "train", "rerank"):
        m = by_stage[stage]
        pod = m["spec"]["template"]["spec"]
        assert container(m)["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert container(m)["image"] == "ghcr.io/inpars/inpars:cuda"
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])  # /dev/shm
    assert "nvidia.com/gpu" not in container(by_stage["filter"])["resources"]["limits"]
    assert container(by_stage["filter"])["image"] == "ghcr.io/inpars/inpars:cpu"


def test_tpu_resources_and_selectors():
    m = next(m for m in render_all("tpu") if m["metadata"]["labels"]["inpars.io/stage"] == "train")
    res = container(m)["resources"]
    assert res["requests"]["google.com/tpu"] == res["limits"]["google.com/tpu"] == "4"
    assert m["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "2x2",
    }
    assert container(m)["image"] == "ghcr.io/inpars/inpars:tpu"


def test_bad_resources_are_config_errors():
    # Settings that can never render are refused when the config is validated, before any rendering.
    with pytest.raises(ConfigError, match="not both"):
        ResourcesConfig.of(gpu=1, tpu_type="tpu-v5-lite-podslice", tpu_topology="2x2")
    with pytest.raises(ConfigError, match="tpu_topology"):
        ResourcesConfig.of(tpu_type="tpu-v5-lite-podslice")
    with pytest.raises(ConfigError, match="gpu >= 1"):
        ResourcesConfig.of(gpu_type="nvidia-l4")
    with pytest.raises(ConfigError, match="cpu = 'lots'"):
        ResourcesConfig.of("resources", cpu="lots")
    kw = dict(run_id="r", namespace="n", image="i:cpu")
    with pytest.raises(ConfigError, match="several hosts"):
        render_job(StageJob("train", 1, ["inpars"], resources=ResourcesConfig(tpu_type="tpu-v5p-slice", tpu_topology="4x4x4")), **kw)
    with pytest.raises(ConfigError, match="outside"):
        render_job(StageJob("generate", 4, ["inpars"]), indexes=[1, 4], **kw)
    with pytest.raises(ConfigError, match="no Job template"):
        render_job(StageJob("nonsense", 1, ["inpars"]), **kw)


def test_api_keys_only_by_reference(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL_KEY)  # present in the launcher's environment...
    manifests = render_all("openai")
    text = json.dumps(manifests) + dry_run(plan_pipeline(variant("openai"), "gs://b/runs/r"), run_id="r", namespace="n", image="i")
    assert SENTINEL_KEY not in text  # ...never in a manifest
    gen = next(m for m in manifests if m["metadata"]["labels"]["inpars.io/stage"] == "generate")
    key = env_of(gen)["OPENAI_API_KEY"]
    assert "value" not in key
    assert key["valueFrom"] == {"secretKeyRef": {"name": SECRET_NAME, "key": "openai-api-key"}}
    others = [m for m in manifests if m is not gen]
    assert all("OPENAI_API_KEY" not in env_of(m) for m in others)  # only the stage that needs it
    job = StageJob("generate", 1, ["x"], env={"OPENAI_API_KEY": "plain"}, secret_env={"OPENAI_API_KEY": (SECRET_NAME, "k")})
    with pytest.raises(ConfigError, match="both"):
        render_job(job, run_id="r", namespace="n", image="i")


def test_names_are_dns_labels_and_distinct():
    long_a, long_b = "a" * 80 + "-x", "a" * 80 + "-y"
    for rid in ("r-1", "Run_2026:11:26", long_a, "-weird-", "UPPER"):
        for stage in ("generate", "negatives", "publish"):
            for attempt in (0, 1, 12):
                name = job_name(rid, stage, attempt)
                assert DNS1123.match(name) and len(name) <= 63, name
                assert name.endswith(f"-{stage}" + (f"-r{attempt}" if attempt else ""))
        assert len(run_label(rid)) <= 63
    assert job_name(long_a, "generate") != job_name(long_b, "generate")
    assert job_name("a_b", "generate") != job_name("a-b", "generate")  # lossy slugs get a hash
    assert job_name("scifact-20261126-ab12", "train") == "inpars-scifact-20261126-ab12-train"  # readable when valid


def test_resume_job_maps_completion_indexes_to_missing_shards():
    job = next(j for j in plan_pipeline(variant("default"), "gs://b/runs/r") if j.stage == "generate")
    m = render_job(job, run_id="r", namespace="n", image="i", indexes=[3, 1], attempt=1)
    assert m["metadata"]["name"].endswith("-generate-r1")
    assert m["spec"]["completions"] == 2 and m["spec"]["parallelism"] <= 2
    env = env_of(m)
    assert env[SHARD_INDEXES_ENV]["value"] == "1,3" and env[SHARD_COUNT_ENV]["value"] == "4"
    assert m["metadata"]["annotations"]["inpars.io/shard-indexes"] == "1,3"
    for version in VERSIONS:
        kubernetes_validate.validate(m, version, strict=True)


def test_validate_manifest_catches_what_schemas_do_not():
    good = render_all("default")[0]
    validate_manifest(good)
    for mutate, message in [
        (lambda m: m["metadata"].update(name="Bad_Name"), "DNS-1123"),
        (lambda m: m["metadata"].update(name="x" * 64), "DNS-1123"),
        (lambda m: container(m)["resources"]["limits"].update(memory="16 GB"), "quantity"),
        (lambda m: m["metadata"]["labels"].update({"inpars.io/run-id": "has space"}), "label"),
        (lambda m: m["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].update(sizeLimit="big"), "quantity"),
        (lambda m: container(m)["env"].append({"name": "1=bad", "value": "x"}), "variable"),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        kubernetes_validate.validate(bad, "1.35.0", strict=True)  # the schema lets it through...
        with pytest.raises(ConfigError, match=message):  # ...validate_manifest does not
            validate_manifest(bad)


def test_image_variants():
    cpu, gpu, tpu = ResourcesConfig(), ResourcesConfig(gpu=2), ResourcesConfig(tpu_type="t", tpu_topology="2x2")
    assert image_for("reg/inpars:cpu", gpu) == "reg/inpars:cuda"
    assert image_for("reg/inpars:cuda", cpu) == "reg/inpars:cpu"
    assert image_for("reg:5000/inpars:{variant}-v1", tpu) == "reg:5000/inpars:tpu-v1"
    assert image_for("reg/inpars:v1.2", gpu) == "reg/inpars:v1.2"  # anything else is used as given
    assert image_for("localhost:5000/inpars", gpu) == "localhost:5000/inpars"


def test_dry_run_is_yaml_of_every_stage():
    jobs = plan_pipeline(variant("publish"), "gs://b/runs/r")
    docs = list(yaml.safe_load_all(dry_run(jobs, run_id="r", namespace="inpars", image="i:cpu")))
    assert [d["metadata"]["labels"]["inpars.io/stage"] for d in docs] == [j.stage for j in jobs]
    assert [d["metadata"]["labels"]["inpars.io/stage"] for d in docs][-1] == "publish"


def test_jobs_folder_is_up_to_date_and_valid():
    expected = render_examples()
    found = {p.name: p.read_text(encoding="utf-8") for p in (ROOT / "jobs").glob("*.yaml")}
    assert found == expected, "jobs/*.yaml are stale: run `python -m inpars.launch.k8s_manifests --write-examples jobs/`"
    for text in expected.values():
        [m] = list(yaml.safe_load_all(text))
        validate_strictly(m)
        validate_manifest(m)
    assert yaml.safe_load(expected["train-tpu-multihost.yaml"])["kind"] == "JobSet"


def validate_jobset(m: dict) -> None:
    """A JobSet against the JobSet API's generated models (kubeflow-trainer-api ships them; no
    package carries the CRD's OpenAPI schema): a wrong type raises, and a field the API does not
    have is dropped by the models, so the round trip must give the manifest back unchanged. Each
    replicated Job's template is a batch/v1 Job spec: checked with the strict Kubernetes schemas."""
    models = pytest.importorskip("kubeflow_trainer_api.models")
    assert m["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and m["kind"] == "JobSet"
    assert models.JobsetV1alpha2JobSet.from_dict(m).to_dict() == m, "a field the JobSet API does not have"
    for rjob in m["spec"]["replicatedJobs"]:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"{m['metadata']['name']}-{rjob['name']}-0"}}
        job["spec"] = rjob["template"]["spec"]
        for version in VERSIONS:
            kubernetes_validate.validate(job, version, strict=True)


def validate_strictly(m: dict) -> None:
    if m["kind"] == "JobSet":
        validate_jobset(m)
    else:
        for version in VERSIONS:
            kubernetes_validate.validate(m, version, strict=True)


def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "k8s" / name).read_text(encoding="utf-8")) if d]


def test_cluster_setup_manifests():
    kustomization = k8s_docs("kustomization.yaml")[0]
    resources = kustomization["resources"]
    assert all((ROOT / "k8s" / r).is_file() for r in resources)
    # `kubectl apply -k k8s/` must work without Kueue CRDs and must never apply the secret template.
    assert not any("kueue" in r or "secret" in r for r in resources)
    docs = [d for r in resources for d in k8s_docs(r)] + k8s_docs("secret.template.yaml")
    for d in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(d, version, strict=True)
        validate_manifest(d)
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):  # cluster-scoped
            assert d["metadata"]["namespace"] == "inpars"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Namespace", "inpars"),
        ("ServiceAccount", "inpars-runner"),
        ("Role", "inpars-launcher"),
        ("RoleBinding", "inpars-launcher"),
    } <= kinds
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "inpars-runner")
    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
    role = next(d for d in docs if d["kind"] == "Role")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules[("batch", "jobs")] == {"create", "get", "list", "watch", "patch", "delete"}
    assert rules[("", "pods")] == {"get", "list", "watch"} and rules[("", "pods/log")] == {"get"}
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert secret["metadata"]["name"] == SECRET_NAME
    assert set(secret["stringData"]) == {"openai-api-key"} and set(secret["stringData"].values()) == {"REPLACE-ME"}
    # The secret's key name is the one plan.py derives for the default api_key_env.
    [job] = [j for j in plan_pipeline(variant("openai"), "gs://b/r") if j.secret_env]
    assert list(job.secret_env.values()) == [(SECRET_NAME, "openai-api-key")]


def test_kueue_component_is_separate():
    docs = k8s_docs("kueue/kueue.yaml")
    assert {d["kind"] for d in docs} == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    assert all(d["apiVersion"].startswith("kueue.x-k8s.io/") for d in docs)
    local = next(d for d in docs if d["kind"] == "LocalQueue")
    assert local["metadata"]["namespace"] == "inpars" and local["spec"]["clusterQueue"] in {d["metadata"]["name"] for d in docs}
    assert k8s_docs("kueue/kustomization.yaml")[0]["resources"] == ["kueue.yaml"]


# ---------------------------------------------------------------- the container contract


def run_container_locally(manifest: dict, index: int, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a rendered container's command with its env, as the kubelet would for completion ``index``."""
    c = container(manifest)
    # The image's PATH holds the `inpars` script; here, this interpreter's scripts folder does.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {"PATH": path, "JOB_COMPLETION_INDEX": str(index), **(extra_env or {})}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:  # secretKeyRef: the kubelet resolves it from the Secret; here a stand-in value
            env[e["name"]] = f"<{e['valueFrom']['secretKeyRef']['key']}>"
    return subprocess.run(c["command"] + c.get("args", []), env=env, capture_output=True, text=True, timeout=60)


def test_container_contract_runs_as_a_local_process():
    probe = (
        "import json, os, sys; from inpars.shards import shard_count_from_env, shard_index_from_env; "
        "index, count = shard_index_from_env(), shard_count_from_env(); "
        "print(json.dumps({'shard': index, 'count': count, 'key': os.environ.get('OPENAI_API_KEY'), 'hf': os.environ.get('HF_HOME')})); "
        f"sys.exit({EXIT_PERMANENT} if index == 3 else 0)"
    )
    job = StageJob(
        "generate",
        5,
        [sys.executable, "-c", probe],
        env={"PYTHONUNBUFFERED": "1"},
        secret_env={"OPENAI_API_KEY": (SECRET_NAME, "openai-api-key")},
    )
    m = render_job(job, run_id="r", namespace="n", image="i", indexes=[0, 3, 4], attempt=1)
    outputs = [run_container_locally(m, i) for i in range(m["spec"]["completions"])]
    rows = [json.loads(p.stdout) for p in outputs]
    assert [r["shard"] for r in rows] == [0, 3, 4] and {r["count"] for r in rows} == {5}
    assert rows[0]["key"] == "<openai-api-key>" and rows[0]["hf"] == "/scratch/hf"
    # Shard 3 exits with the permanent code: exactly the code the FailIndex rule matches.
    codes = [p.returncode for p in outputs]
    assert codes == [0, EXIT_PERMANENT, 0]
    assert m["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [codes[1]]
    # Without the mapping (a first attempt) the completion index is the shard.
    plain = render_job(job, run_id="r", namespace="n", image="i")
    assert json.loads(run_container_locally(plain, 2).stdout)["shard"] == 2
    env = {"JOB_COMPLETION_INDEX": "1", SHARD_INDEXES_ENV: "5,9", SHARD_COUNT_ENV: "10"}
    assert (shard_index_from_env(environ=env), shard_count_from_env(env)) == (9, 10)
    with pytest.raises(ConfigError):
        shard_index_from_env(environ={"JOB_COMPLETION_INDEX": "2", SHARD_INDEXES_ENV: "5,9"})


# ---------------------------------------------------------------- images (no Docker engine here: lint)

IMAGES = ROOT / "images"
PINNED = re.compile(r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?==[0-9][A-Za-z0-9.+\-!]*$")


def dockerfile_runs(path: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("flavour", ["cpu", "cuda", "tpu"])
def test_dockerfiles_pin_everything(flavour):
    path = IMAGES / f"Dockerfile.{flavour}"
    lines = dockerfile_runs(path)
    args = {m.group(1): m.group(2) for ln in lines if (m := re.match(r"ARG (\w+)=(\S+)", ln))}
    base = next(ln for ln in lines if ln.startswith("FROM ")).split()[1]
    assert ":" in base and not base.endswith(":latest") and re.search(r":\S*\d+\.\d+", base), base
    installs = []
    for ln in lines:
        for cmd in re.split(r"&&|;|\bthen\b", ln):
            words = shlex.split(cmd.replace("RUN ", " ", 1)) if "pip install" in cmd else []
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    assert installs, "no pip install in " + path.name
    for words in installs:
        packages = [w for w in words if not w.startswith("-")]
        # Values of options (an index URL, a constraints file) are not packages.
        for opt in ("--index-url", "--extra-index-url", "--constraint", "-c", "-r"):
            if opt in words:
                packages.remove(words[words.index(opt) + 1])
        for pkg in packages:
            pkg = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], pkg)
            if pkg == ".":  # the project itself: only under the pinned constraints
                assert "--constraint" in words, words
            else:
                assert PINNED.match(pkg), f"{path.name}: unpinned {pkg!r}"
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^USER 1000:1000$", text, re.M)  # non-root, matches runAsUser in the Jobs
    assert "HOME=/home/inpars" in text and "HF_HOME=/scratch/hf" in text
    assert 'ENTRYPOINT ["inpars"]' in text
    assert not re.search(r"huggingface-cli|hf download|snapshot_download|from_pretrained", text)  # no baked downloads
    torch = re.search(r"torch==(\S+)", text)
    if flavour == "cpu":
        assert torch and torch.group(1) == "2.13.0" and "download.pytorch.org/whl/cpu" in text
    if flavour == "tpu":
        assert re.search(r"torch_xla\[tpu\]==(\S+?)\"", text).group(1) == torch.group(1)  # must match exactly
    assert (IMAGES / f"Dockerfile.{flavour}.dockerignore").is_file()


def test_constraints_are_pinned_and_cover_the_dependencies():
    lines = [ln.split("#")[0].strip() for ln in (IMAGES / "constraints.txt").read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    assert pins and all(PINNED.match(p) for p in pins), pins
    pinned = {re.split(r"[=\[]", p)[0].lower().replace("_", "-") for p in pins}
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!\[; ]", d)[0].lower().replace("_", "-") for d in deps} - {"torch"}
    assert names <= pinned, f"not pinned in images/constraints.txt: {sorted(names - pinned)}"


def test_container_contract_with_the_real_worker(tmp_path):
    """The rendered command is the real `inpars worker`: the resume mapping and exit code 42 hold."""
    from inpars.workspace import Run

    config = PipelineConfig().override({"generate.shards": 3})
    run = Run.create(str(tmp_path / "ws"), config, "contract-1")
    run.commit_shard("prepare", 0, 1, b"{}", ext="json")  # as if prepared: this test is about generate shards
    for shard in (0, 2):
        run.commit_shard("generate", shard, 3, b'{"query": "q", "doc_id": "d"}\n', rows=1)
    jobs = {j.stage: j for j in plan_pipeline(run.config, run.uri)}
    # A resume Job for shards 0 and 2 (as if they were missing): completion index 1 -> shard 2.
    m = render_job(jobs["generate"], run_id=run.run_id, namespace="n", image="i", indexes=[0, 2], attempt=1)
    for index in range(m["spec"]["completions"]):
        proc = run_container_locally(m, index)
        assert proc.returncode == 0, proc.stderr
        assert "generate: already committed" in proc.stderr  # shard 1 (uncommitted) was never started
    # filter needs every generate shard: a permanent error, exit 42 = the FailIndex rule's code.
    f = render_job(jobs["filter"], run_id=run.run_id, namespace="n", image="i")
    proc = run_container_locally(f, 0)
    assert proc.returncode == EXIT_PERMANENT == f["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"][0]
    assert "generate shards 1 of 3" in proc.stderr


# ---------------------------------------------------------------- rules the API server enforces

# The longest BEIR names, as deterministic run ids (dataset + config hash) and at the 63-char limit.
LONGEST_RUN_IDS = [
    "cqadupstack-mathematica-3f9c2a7b41d0",
    "cqadupstack-programmers-3f9c2a7b41d0",
    "webis-touche2020-3f9c2a7b41d0",
    "cqadupstack-programmers-" + "0123456789abcdef" * 2 + "0123456",  # 63 characters
    "r" * 63,
]


def sharded(shards: int = 64) -> PipelineConfig:
    return PipelineConfig().override({"generate.shards": shards, "negatives.shards": shards, "rerank.shards": shards})


@pytest.mark.parametrize("run_id", LONGEST_RUN_IDS)
def test_pod_hostnames_fit_at_the_longest_names_with_64_shards(run_id):
    assert max(len(r) for r in LONGEST_RUN_IDS) == 63
    jobs = plan_pipeline(sharded(64), f"gs://b/ws/runs/{run_id}")
    names = set()
    for job in jobs:
        resumes = [None, [job.shards - 1], list(range(0, job.shards, 2))]
        for attempt, indexes in [(0, None), (1, resumes[1]), (2, resumes[2]), (17, resumes[0]), (123, resumes[1])]:
            m = render_job(job, run_id=run_id, namespace="inpars", image="i:cpu", queue="inpars", indexes=indexes, attempt=attempt)
            name = m["metadata"]["name"]
            hostname = f"{name}-{m['spec']['completions'] - 1}"
            assert DNS1123.match(hostname) and len(hostname) <= 63, hostname
            # Every pod of the stage's full shard count fits too (a resume Job never has more).
            assert len(f"{name}-{job.shards - 1}") <= 63
            assert name.endswith(f"-{job.stage}" + (f"-r{attempt}" if attempt else ""))
            assert all(len(v) <= 63 for v in m["metadata"]["labels"].values())
            assert m["metadata"]["annotations"]["inpars.io/run-id"] == run_id  # unabridged
            names.add(name)
            if attempt in (0, 1):  # the schemas too (a sample: they take a while)
                kubernetes_validate.validate(m, VERSIONS[-1], strict=True)
    assert len(names) == len(jobs) * 5  # every stage and attempt has its own name


def test_validate_manifest_rejects_what_the_api_server_would():
    job = plan_pipeline(sharded(64), "gs://b/r")[0]
    good = render_job(job, run_id="cqadupstack-mathematica", namespace="n", image="i")
    # The old budget (63 characters for the name alone): a valid name, but the last pod's hostname is not.
    bad = copy.deepcopy(good)
    bad["metadata"]["name"] = ("inpars-cqadupstack-mathematica-" + "x" * 63)[:54] + "-generate"
    assert len(bad["metadata"]["name"]) == 63
    kubernetes_validate.validate(bad, "1.35.0", strict=True)
    with pytest.raises(ConfigError, match="hostname"):
        validate_manifest(bad)
    long_queue = copy.deepcopy(good)
    long_queue["metadata"]["labels"][QUEUE_LABEL] = "q" * 64
    with pytest.raises(ConfigError, match="label"):
        validate_manifest(long_queue)
    # --dry-run renders through the same checks: it fails before anything is submitted.
    with pytest.raises(ConfigError, match="label"):
        dry_run([job], run_id="r", namespace="n", image="i", queue="q" * 64)


def test_deadlines_and_parallelism_cap():
    cfg = sharded(16)
    cfg.resources["generate"] = ResourcesConfig(cpu="4", memory="16Gi", active_deadline_seconds=7200, pending_deadline_seconds=600)
    by_stage = {j.stage: j for j in plan_pipeline(cfg, "gs://b/r")}
    gen = render_job(by_stage["generate"], run_id="r", namespace="n", image="i")
    assert gen["spec"]["activeDeadlineSeconds"] == 7200
    assert gen["metadata"]["annotations"]["inpars.io/pending-deadline-seconds"] == "600"
    assert gen["spec"]["parallelism"] == 16  # default: every shard at once
    assert render_job(by_stage["generate"], run_id="r", namespace="n", image="i", max_parallel_pods=4)["spec"]["parallelism"] == 4
    neg = render_job(by_stage["negatives"], run_id="r", namespace="n", image="i")
    assert neg["spec"]["activeDeadlineSeconds"] == 12 * 3600  # the stage's default
    assert neg["metadata"]["annotations"]["inpars.io/pending-deadline-seconds"] == "3600"
    with pytest.raises(ConfigError, match="active_deadline_seconds"):
        ResourcesConfig.of(active_deadline_seconds=0)  # refused with the config, before rendering


# ---------------------------------------------------------------- accelerators

CHIPS_PER_HOST = [
    # (accelerator, topology, chips, hosts, google.com/tpu per pod)
    ("tpu-v5-lite-podslice", "1x1", 1, 1, 1),
    ("tpu-v5-lite-podslice", "2x2", 4, 1, 4),
    ("tpu-v5-lite-podslice", "2x4", 8, 1, 8),
    ("tpu-v5-lite-podslice", "4x4", 16, 4, 4),
    ("tpu-v5-lite-podslice", "16x16", 256, 64, 4),
    ("tpu-v6e-slice", "1x1", 1, 1, 1),
    ("tpu-v6e-slice", "2x4", 8, 1, 8),
    ("tpu-v6e-slice", "4x8", 32, 8, 4),
    ("tpu-v5p-slice", "2x2x1", 4, 1, 4),
    ("tpu-v5p-slice", "2x2x2", 8, 2, 4),  # not google.com/tpu: 8 on one pod (that stays Pending for ever)
    ("tpu-v5p-slice", "4x4x8", 128, 32, 4),
    ("tpu-v4-podslice", "2x2x1", 4, 1, 4),
    ("tpu-v4-podslice", "2x2x4", 16, 4, 4),
]


@pytest.mark.parametrize(("accelerator", "topology", "chips", "hosts", "per_pod"), CHIPS_PER_HOST)
def test_chips_per_host_table(accelerator, topology, chips, hosts, per_pod):
    s = tpu_slice(accelerator, topology)
    assert (s.chips, s.hosts, s.chips_per_pod, s.multi_host) == (chips, hosts, per_pod, hosts > 1)


def test_tpu_and_gpu_requests_that_never_schedule_are_refused():
    for tpu_type, topology, message in [
        ("tpu-v9-imaginary", "2x2", "unknown tpu_type"),
        ("tpu-v5-lite-podslice", "2x2x1", "2 dimensions"),
        ("tpu-v5p-slice", "2x2", "3 dimensions"),
        ("tpu-v5-lite-podslice", "3x3", "no slice"),
        ("tpu-v5p-slice", "2x2x3", "no slice"),
        ("tpu-v4-podslice", "1x1x1", "no slice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tpu_slice(tpu_type, topology)
    kw = dict(run_id="r", namespace="n", image="i")
    with pytest.raises(ConfigError, match="at most 8"):
        render_job(StageJob("train", 1, ["x"], resources=ResourcesConfig(gpu=9, gpu_type="nvidia-l4")), **kw)
    with pytest.raises(ConfigError, match="unknown gpu_type"):
        render_job(StageJob("train", 1, ["x"], resources=ResourcesConfig(gpu=1, gpu_type="nvidia-l5")), **kw)
    with pytest.raises(ConfigError, match="only train"):
        render_job(StageJob("rerank", 2, ["x"], resources=ResourcesConfig(gpu=2, gpu_type="nvidia-l4")), **kw)


@pytest.mark.parametrize(("accelerator", "topology", "chips", "hosts", "per_pod"), [c for c in CHIPS_PER_HOST if c[3] > 1])
def test_multi_host_slices_render_a_jobset(accelerator, topology, chips, hosts, per_pod):
    cfg = PipelineConfig()
    cfg.resources["train"] = ResourcesConfig(cpu="8", memory="64Gi", tpu_type=accelerator, tpu_topology=topology)
    [train] = [j for j in plan_pipeline(cfg, "gs://b/r") if j.stage == "train"]
    with pytest.raises(ConfigError, match="several hosts"):
        render_job(train, run_id="r", namespace="n", image="i")
    for run_id, attempt in [("r-1", 0), (LONGEST_RUN_IDS[-1], 3)]:
        m = render_stage(train, run_id=run_id, namespace="inpars", image="reg/inpars:cpu", queue="inpars", attempt=attempt)
        validate_jobset(m)
        validate_manifest(m)
        assert m["metadata"]["labels"][QUEUE_LABEL] == "inpars" and m["spec"]["suspend"] is True
        [rjob] = m["spec"]["replicatedJobs"]
        assert rjob["replicas"] == 1
        spec = rjob["template"]["spec"]
        assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == hosts
        assert spec["backoffLimit"] == 0 and "suspend" not in spec
        pod = spec["template"]["spec"]
        assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator, "cloud.google.com/gke-tpu-topology": topology}
        [c] = pod["containers"]
        assert c["resources"]["limits"]["google.com/tpu"] == c["resources"]["requests"]["google.com/tpu"] == str(per_pod)
        assert c["image"] == "reg/inpars:tpu"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["INPARS_HOST_COUNT"] == str(hosts) and env["INPARS_SHARD_INDEXES"] == ",".join(["0"] * hosts)
        assert env["PJRT_DEVICE"] == "TPU" and env["INPARS_DEVICE"] == "tpu"
        # The JobSet webhook's name rule: <jobset>-slice-<job>-<pod>-<5 chars> is a DNS label.
        assert len(f"{m['metadata']['name']}-slice-0-{hosts - 1}-abcde") <= 63
        # Every host is told its shard the way a pod reads it.
        for host in range(hosts):
            assert shard_index_from_env(environ={**env, "JOB_COMPLETION_INDEX": str(host)}) == 0
            assert host_from_env({**env, "JOB_COMPLETION_INDEX": str(host)}) == (host, hosts)
    # A sharded stage cannot share one slice: refused with what to do instead.
    cfg.resources["rerank"] = ResourcesConfig(cpu="8", memory="64Gi", tpu_type=accelerator, tpu_topology=topology)
    [rerank] = [j for j in plan_pipeline(cfg.override({"rerank.shards": 2}), "gs://b/r") if j.stage == "rerank"]
    with pytest.raises(ConfigError, match="one shard at a time"):
        render_stage(rerank, run_id="r", namespace="n", image="i")


def test_validate_jobset_is_strict():
    cfg = PipelineConfig()
    cfg.resources["train"] = ResourcesConfig(tpu_type="tpu-v5p-slice", tpu_topology="2x2x2")
    [train] = [j for j in plan_pipeline(cfg, "gs://b/r") if j.stage == "train"]
    good = render_stage(train, run_id="r", namespace="n", image="i")
    validate_jobset(good)
    for mutate in [
        lambda m: m["spec"].update(replicatedJob=m["spec"]["replicatedJobs"]),  # a misspelt field
        lambda m: m["spec"]["replicatedJobs"][0].update(replicas="1"),  # a string for an integer
        lambda m: m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].update(imagee="x"),
    ]:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError, or the round trip's AssertionError
            validate_jobset(bad)


def test_devices_and_the_multi_gpu_train_pod():
    cpu, gpu, tpu = render_all("default"), render_all("gpu"), render_all("tpu")
    assert {env_of(m)["INPARS_DEVICE"]["value"] for m in cpu} == {"cpu"}
    by_stage = {m["metadata"]["labels"]["inpars.io/stage"]: m for m in gpu}
    assert env_of(by_stage["train"])["INPARS_DEVICE"]["value"] == "cuda" and "PJRT_DEVICE" not in env_of(by_stage["train"])
    train_tpu = next(m for m in tpu if m["metadata"]["labels"]["inpars.io/stage"] == "train")
    assert env_of(train_tpu)["INPARS_DEVICE"]["value"] == "tpu" and env_of(train_tpu)["PJRT_DEVICE"]["value"] == "TPU"
    # Several GPUs: the train pod runs the plain worker, which starts one process per GPU itself (after
    # it holds the shard's lease: torchrun would start N workers racing for it), see inpars.distributed.
    job = StageJob(
        "train", 1, ["inpars", "worker", "train", "--run", "gs://b/r"], resources=ResourcesConfig(gpu=4, gpu_type="nvidia-h100-80gb")
    )
    m = render_job(job, run_id="r", namespace="n", image="i:cpu")
    assert container(m)["command"] == ["inpars", "worker", "train", "--run", "gs://b/r"]
    assert container(m)["resources"]["limits"]["nvidia.com/gpu"] == "4" and env_of(m)["INPARS_DEVICE"]["value"] == "cuda"


def test_the_shipped_kueue_queue_covers_every_accelerator():
    docs = k8s_docs("kueue/kueue.yaml")
    flavors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ResourceFlavor"}
    [cq] = [d for d in docs if d["kind"] == "ClusterQueue"]
    view = QueueView("inpars", cq, flavors)
    for gpu_type in GPU_TYPES:
        job = StageJob("generate", 4, ["x"], resources=ResourcesConfig(gpu=1, gpu_type=gpu_type), parallelism=4)
        verdict = check_admission(render_job(job, run_id="r", namespace="n", image="i"), view)
        assert verdict.fits, (gpu_type, verdict.problems)
    for accelerator, topology, *_ in CHIPS_PER_HOST:
        cfg = PipelineConfig()
        cfg.resources["train"] = ResourcesConfig(cpu="8", memory="32Gi", tpu_type=accelerator, tpu_topology=topology)
        [train] = [j for j in plan_pipeline(cfg, "gs://b/r") if j.stage == "train"]
        verdict = check_admission(render_stage(train, run_id="r", namespace="n", image="i"), view)
        if tpu_slice(accelerator, topology).chips <= 32:  # the shipped quota: 32 chips per generation
            assert verdict.fits, (accelerator, topology, verdict.problems)
        else:
            assert not verdict.fits and "google.com/tpu" in verdict.explain("inpars")


def test_driver_job_at_the_longest_run_ids():
    from inpars.launch.detach import beir_driver_manifest, run_driver_manifest
    from inpars.launch.k8s_manifests import driver_job_name

    longest = "cqadupstack-mathematica-" + "x" * 39  # a 63-character run id, the most a run id may have
    assert len(longest) == 63
    m = run_driver_manifest(f"gs://b/ws/runs/{longest}", longest, namespace="inpars", image="reg/inpars:cuda", until="train")
    validate_strictly(m)
    validate_manifest(m)
    name = m["metadata"]["name"]
    assert name == driver_job_name(longest) and len(name) <= 63 and name.endswith("-driver")
    assert m["metadata"]["annotations"]["inpars.io/run-id"] == longest  # unabridged
    [container] = m["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "reg/inpars:cpu"  # the driver needs no accelerator
    assert container["command"][-2:] == ["--until", "train"] and "reg/inpars:cuda" in container["command"]  # stages pick their variant
    ids = [f"dataset-{i:02d}-" + "y" * 40 for i in range(29)]
    beir = beir_driver_manifest("gs://b/ws", ids, namespace="inpars", image="reg/inpars:cpu")
    validate_strictly(beir)
    assert beir["metadata"]["name"].startswith("inpars-beir-") and beir["metadata"]["annotations"]["inpars.io/run-ids"] == ",".join(ids)
    # The same request (any order of its runs) names the same driver: a second one meets a 409.
    same = beir_driver_manifest("gs://b/ws/", list(reversed(ids)), namespace="inpars", image="reg/inpars:cpu")
    other = beir_driver_manifest("gs://b/ws", ids[:-1], namespace="inpars", image="reg/inpars:cpu")
    assert same["metadata"]["name"] == beir["metadata"]["name"] != other["metadata"]["name"]


def test_pods_are_sized_from_the_prepared_data():
    from inpars.pipeline import DataSize, resources_for

    config = PipelineConfig()
    small, large = DataSize(600, 10**6, 10**6, 10**6), DataSize(10_000_000, 4 * 10**9, 4 * 10**9, 3 * 10**9)
    assert resources_for(config, "negatives", small).memory == "2Gi"  # a few bytes a document: the default has room
    neg = resources_for(config, "negatives", large)
    assert neg.memory == "2816Mi" and neg.ephemeral_storage == "10Gi"  # 2Gi + 64 B/doc; 2Gi + store + index, +10%
    prep = resources_for(config, "prepare", large)
    assert prep.memory == "7Gi" and prep.ephemeral_storage == "17Gi"  # 4Gi + 256 B/doc; 2Gi + corpus + store + 2x index, +10%
    assert resources_for(config, "negatives", None) == resources_for(config, "negatives")  # no data: the defaults
    user = config.override({"resources.negatives.memory": "1Gi"})
    assert resources_for(user, "negatives", large).memory == "1Gi"  # the user's setting wins
    assert resources_for(user, "negatives", large).ephemeral_storage == "10Gi"  # unset there: still sized
    job = next(j for j in plan_pipeline(config, "gs://b/runs/r", data=large) if j.stage == "negatives")
    m = render_job(job, run_id="r", namespace="n", image="i")
    assert container(m)["resources"]["limits"]["ephemeral-storage"] == "10Gi"
    scratch = next(v for v in m["spec"]["template"]["spec"]["volumes"] if v["name"] == "scratch")
    assert scratch["emptyDir"]["sizeLimit"] == "10Gi"  # the volume the pod writes the store and index to

"""The workflow on a real (single-node, throw-away) SLURM through the repository's cluster profile.

tests/slurm/start_slurm.sh starts munged + slurmctld + slurmd with fake GPUs (GRES backed by mknod
devices); the tests submit through snakemake-executor-plugin-slurm with a copy of
workflow/profiles/slurm/config.yaml that only adds the test partition, small resources and fast polling.

Needs root and Debian's `slurmctld slurmd slurm-client munge` (start_slurm.sh installs them with apt-get
when missing). Skipped otherwise -- unless GEM3D_REQUIRE_SLURM=1 (CI), where that is a failure.

    .venv/bin/python -m pytest tests/test_slurm.py -q -m slurm
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = REPO / "tests" / "slurm"
PROFILE_TEMPLATE = REPO / "workflow" / "profiles" / "slurm" / "config.yaml"

# What the SLURM run builds (demo config). Append GPU stages here together with their rule names below,
# e.g. TARGETS.append("results/demo/models/vae.pt"); GPU_RULES.append("train_vae").
TARGETS: list[str] = ["results/demo/slices/index.json", "results/demo/models/vae.pt"]
# Rules that must have run as SLURM jobs for TARGETS (a fresh directory: every one of them runs).
EXPECTED_RULES: list[str] = ["make_phantoms", "import_data", "preprocess_nnunet", "build_slices"]
# Rules declaring `resources: gpu=1`: their log (results/demo/logs/<rule>.log, so rules without wildcards) must show
# the CUDA_VISIBLE_DEVICES that SLURM set; the EXPECTED_RULES logs must show `<unset>` (CPU jobs get no GPU).
GPU_RULES: list[str] = ["train_vae"]

# Applied to the test's copy of config/config.yaml (every key must exist there): the SLURM test checks
# plumbing, not training quality, and the plugin's status polling backs off (+10 s per check), so a long
# job costs extra waiting on top of its own time.
CONFIG_OVERRIDES: dict = {"vae": {"train": {"steps": 20, "log_every": 10, "checkpoint_every": 10}}}

# A test-only rule next to the real workflow (included, not edited): a `gpu=1` job through the plugin,
# its `sbatch --gpus=1` and the jobstep's nested `srun --gpus=1`, independent of any gem3d GPU stage.
PROBE_RULE = "slurm_gpu_probe"
PROBE_OUTPUT = "results/slurm_probe/gpu.txt"
PROBE_SNAKEFILE = f"""\
include: "workflow/Snakefile"


rule {PROBE_RULE}:
    output:
        "{PROBE_OUTPUT}",
    resources:
        gpu=1,
    shell:
        "echo gem3d probe: CUDA_VISIBLE_DEVICES=${{{{CUDA_VISIBLE_DEVICES:-<unset>}}}} > {{output}}"
"""

# The demo data chain takes 75-100 s on 2 idle cores: per stage ~5 s of Snakemake start-up inside the job
# plus 1-30 s until the plugin's backed-off status check notices the job ended; ~165 s with train_vae.
SNAKEMAKE_TIMEOUT_S = 360
CUDA_LINE = re.compile(r"gem3d(?: [\w-]+)?: CUDA_VISIBLE_DEVICES=(\S*)")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}


def _unavailable(reason: str):
    if os.environ.get("GEM3D_REQUIRE_SLURM") == "1":
        pytest.fail(f"GEM3D_REQUIRE_SLURM=1 but the test SLURM cannot run: {reason}")
    pytest.skip(reason)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    state: Path
    partition: str
    env: dict[str, str]

    def run(self, args: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)

    def jobs(self) -> dict[str, tuple[str, str]]:
        """{job id: (state, comment)} of every job slurmctld still knows (MinJobAge=600 s)."""
        out = self.run(["squeue", "-h", "--states=all", "-o", "%i|%T|%k"], check=True).stdout
        rows = (line.split("|", 2) for line in out.splitlines() if line.strip())
        return {r[0]: (r[1], r[2]) for r in rows if len(r) == 3}

    def wait(self, job_ids: list[str], timeout: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            states = {j: jobs.get(j, ("MISSING", ""))[0] for j in job_ids}
            if all(s in DONE_STATES for s in states.values()) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def log_tail(self, name: str, n: int = 40) -> str:
        path = self.state / name
        lines = path.read_text(errors="replace").splitlines()[-n:] if path.exists() else ["(missing)"]
        return f"---- {path}\n" + "\n".join(lines)


@pytest.fixture(scope="module")
def slurm_cluster():
    if os.geteuid() != 0:
        _unavailable("needs root to start munged/slurmctld/slurmd")
    if shutil.which("timeout") is None:
        _unavailable("needs coreutils `timeout`")
    state = Path(tempfile.mkdtemp(prefix="gem3d-slurm-", dir="/tmp"))  # short: munge's socket path
    ctld_port, slurmd_port = _free_ports(2)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SNAKEMAKE_PROFILE"))
           and k != "CUDA_VISIBLE_DEVICES"}
    env.update(GEM3D_SLURM_CTLD_PORT=str(ctld_port), GEM3D_SLURM_D_PORT=str(slurmd_port))
    try:
        proc = subprocess.run(["bash", str(SLURM_SCRIPTS / "start_slurm.sh"), str(state)], env=env,
                              capture_output=True, text=True, timeout=700)
    except subprocess.TimeoutExpired:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_slurm.sh"), str(state)], timeout=120)
        pytest.fail("start_slurm.sh timed out")
    if proc.returncode != 0:
        shutil.rmtree(state, ignore_errors=True)
        if proc.returncode == 77:
            _unavailable(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "start_slurm.sh")
        pytest.fail(f"start_slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    try:
        exports = dict(re.findall(r"^export (\w+)=(.*)$", (state / "env.sh").read_text(), re.M))
        env["SLURM_CONF"] = exports["SLURM_CONF"]
        # Our SLURM clients first, then this Python's bin (gem3d, snakemake), so jobs find both.
        env["PATH"] = os.pathsep.join([str(state / "bin"), str(Path(sys.executable).parent), env["PATH"]])
        yield Cluster(state=state, partition=exports["GEM3D_SLURM_PARTITION"], env=env)
    finally:
        stop = subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_slurm.sh"), str(state)], env=env,
                              capture_output=True, text=True, timeout=120)
        if stop.returncode == 0:
            shutil.rmtree(state, ignore_errors=True)


# snakemake-executor-plugin-slurm version that introduced each profile setting used (pyproject.toml's floor)
PLUGIN_SETTING_SINCE = {"slurm-status-command": (2, 1), "slurm-jobname-prefix": (2, 2)}


def test_profile_keys_are_settings_of_the_plugin_floor():
    """Every slurm-* key of the profile (commented ones too) is a plugin setting; the pyproject floor has them."""
    import dataclasses
    import tomllib

    from snakemake_executor_plugin_slurm import ExecutorSettings

    text = PROFILE_TEMPLATE.read_text()
    keys = set(re.findall(r"^#? ?(slurm-[a-z-]+):", text, flags=re.MULTILINE))
    fields = {f"slurm-{f.name.replace('_', '-')}" for f in dataclasses.fields(ExecutorSettings)}
    assert keys and keys <= fields, keys - fields
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("snakemake-executor-plugin-slurm"))
    floor = tuple(int(x) for x in re.search(r">=([0-9.]+)", spec).group(1).split("."))
    needed = max(v for k, v in PLUGIN_SETTING_SINCE.items() if k in yaml.safe_load(text))
    assert floor >= needed, (spec, needed)


def test_profile_gpu_block_names_every_gpu_rule():
    """The commented set-resources block of the template lists every rule that asks for a GPU in the demo and
    the paper config, and no other rule (the demo plans no real + k rows; the paper config does)."""
    from gem3d import resources
    from gem3d.config import load_config
    from gem3d.sampling.sets import downstream_sets

    lines = PROFILE_TEMPLATE.read_text().split("# set-resources:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    block = yaml.safe_load("\n".join(line[2:] for line in lines))
    planned = set()
    for config in ("config.yaml", "brats.yaml"):
        cfg = load_config(REPO / "config" / config, check_paths=False)
        gpu_rules = {r for r in resources.GPU_RULES if r != "train_segmentation"}
        gpu_rules |= {f"train_segmentation_{d}" for d in downstream_sets(cfg)}
        assert gpu_rules <= set(block), gpu_rules - set(block)
        planned |= gpu_rules
    assert set(block) == planned, set(block) ^ planned
    assert all(v["slurm_partition"] == "<gpu-partition>" for v in block.values())


def test_profile_template_is_site_neutral():
    """The shipped profile names no site (partition/account) and polls with squeue (no slurmdbd needed)."""
    profile = yaml.safe_load(PROFILE_TEMPLATE.read_text())
    assert profile["executor"] == "slurm"
    assert profile["slurm-status-command"] == "squeue"
    res = profile["default-resources"]
    assert {"mem_mb", "runtime", "cpus_per_task"} <= set(res)
    assert not {"slurm_partition", "slurm_account", "gpu", "gres"} & set(res), res
    assert "set-resources" not in profile  # per-site GPU partitions live in the user's copy


@pytest.mark.slurm
def test_sbatch_gpus_sets_cuda_visible_devices(slurm_cluster, tmp_path):
    """The GPU mechanism itself: `--gpus=1` gets a device in CUDA_VISIBLE_DEVICES, a CPU job gets none."""
    wrap = 'echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}"'
    ids = {}
    for name, extra in (("gpu", ["--gpus=1"]), ("cpu", [])):
        proc = slurm_cluster.run(["sbatch", "--parsable", "-p", slurm_cluster.partition, "-t", "1",
                                  "--mem", "100", *extra, "-o", str(tmp_path / f"{name}.out"),
                                  "-D", str(tmp_path), "--wrap", wrap], check=True)
        ids[name] = proc.stdout.strip().split(";")[0]
    states = slurm_cluster.wait(list(ids.values()), timeout=60)
    assert set(states.values()) == {"COMPLETED"}, (states, slurm_cluster.log_tail("slurmd.log"))
    gpu = (tmp_path / "gpu.out").read_text().strip()
    cpu = (tmp_path / "cpu.out").read_text().strip()
    assert re.fullmatch(r"CUDA_VISIBLE_DEVICES=\d+", gpu), gpu
    assert cpu == "CUDA_VISIBLE_DEVICES=<unset>", cpu


def _override(config: dict, overrides: dict, where: str = "") -> None:
    for key, value in overrides.items():
        assert key in config, f"CONFIG_OVERRIDES: {where}{key} is not in config/config.yaml; update the test"
        if isinstance(value, dict):
            _override(config[key], value, f"{where}{key}.")
        else:
            config[key] = value


def _job_stats_rules(output: str) -> set[str]:
    """Rule names of snakemake's first 'Job stats' table (the jobs this run had to do)."""
    match = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+\d+", output, re.S)
    assert match, "no 'Job stats' table in snakemake's output"
    return {line.split()[0] for line in match.group(1).splitlines() if line.strip()}


@pytest.mark.slurm
def test_demo_workflow_runs_every_rule_through_sbatch(slurm_cluster, tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    for sub in ("workflow", "config", "envs"):
        shutil.copytree(REPO / sub, work / sub, ignore=shutil.ignore_patterns(".snakemake", "__pycache__"))
    (work / "slurm_probe.smk").write_text(PROBE_SNAKEFILE)
    config = yaml.safe_load((work / "config" / "config.yaml").read_text())
    _override(config, CONFIG_OVERRIDES)
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    # The repository's profile, plus only what this test cluster needs.
    profile = yaml.safe_load(PROFILE_TEMPLATE.read_text())
    profile["default-resources"] = {**profile["default-resources"], "slurm_partition": slurm_cluster.partition,
                                    "mem_mb": 500, "runtime": 10}
    profile.update({"retries": 0, "keep-going": False, "latency-wait": 5,
                    "slurm-init-seconds-before-status-checks": 1, "seconds-between-status-checks": 1,  # fast polls
                    "slurm-keep-successful-logs": True})
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))

    cmd = ["timeout", "-k", "15", str(SNAKEMAKE_TIMEOUT_S), sys.executable, "-m", "snakemake",
           "--snakefile", "slurm_probe.smk", *TARGETS, PROBE_OUTPUT,  # targets before options taking lists
           "--profile", str(tmp_path / "profile"), "--workflow-profile", "none", "--jobs", "2",
           "--verbose"]  # --verbose: the plugin logs each `sbatch call: ...`
    start, started_at = time.monotonic(), time.time()
    proc = subprocess.run(cmd, cwd=work, env=slurm_cluster.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=SNAKEMAKE_TIMEOUT_S + 60)
    elapsed = time.monotonic() - start
    output = proc.stdout
    print(f"snakemake on SLURM: {elapsed:.0f} s")
    context = f"\n{output[-6000:]}\n{slurm_cluster.log_tail('slurmctld.log')}"
    if proc.returncode != 0:
        for log in sorted((work / ".snakemake" / "slurm_logs").rglob("*.log")):
            context += f"\n---- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    assert proc.returncode == 0, f"snakemake exited {proc.returncode} after {elapsed:.0f} s" + context

    for target in [*TARGETS, PROBE_OUTPUT]:
        assert (work / target).exists(), target
        assert not (REPO / target).exists() or (REPO / target).stat().st_mtime < started_at, target

    # Every job of this run went through sbatch: snakemake's submission line, the plugin's log file,
    # and slurmctld's record of a COMPLETED job whose comment names the rule.
    ran = _job_stats_rules(output)
    assert {*EXPECTED_RULES, *GPU_RULES, PROBE_RULE} <= ran, ran
    submitted: dict[str, list[str]] = {}  # rule -> SLURM job ids (rules with wildcards: several)
    for job_id, log, rule in re.findall(
            r"has been submitted with SLURM jobid (\d+) \(log: (\S+/rule_(\w+)/(?:[^/\s]+/)?\d+\.log)\)",
            output):
        submitted.setdefault(rule, []).append(job_id)
        assert Path(log).is_file(), log
    assert ran <= set(submitted), f"not submitted to SLURM: {ran - set(submitted)}" + context
    jobs = slurm_cluster.jobs()
    for rule in ran:
        for job_id in submitted[rule]:
            state, comment = jobs.get(job_id, ("MISSING", ""))
            assert state == "COMPLETED", (rule, job_id, state, comment)
            assert comment == f"rule_{rule}" or comment.startswith(f"rule_{rule}_wildcards_"), (rule, comment)

    # Every job was submitted with the memory, time and GPUs gem3d/resources.py gives its rule.
    from gem3d import resources
    from gem3d.config import load_config

    calls = {m.group(2): m.group(1) for m in re.finditer(r"sbatch call: (.*--comment '?rule_(\w+?)'?\s.*)", output)}
    assert ran - {PROBE_RULE} <= set(calls), f"no sbatch call logged for {ran - set(calls)}"
    cwd = os.getcwd()
    os.chdir(work)  # the config's paths are relative to the run's directory
    try:
        cfg = load_config("config/config.yaml", check_paths=False)
        sizes = {rule: resources.job_size(cfg, rule, work / "results" / "demo") for rule in ran - {PROBE_RULE}}
    finally:
        os.chdir(cwd)
    for rule, size in sizes.items():
        call = calls[rule]
        assert re.search(rf" -t {size.runtime}( |$)", call) and re.search(rf" --mem {size.mem_mb}( |$)", call), (
            rule, size, call)
        assert ("--gpus=1" in call) == bool(size.gpu), (rule, size, call)

    # GPU jobs see the GPU SLURM gave them; CPU jobs see none.
    probe = (work / PROBE_OUTPUT).read_text().strip()
    assert re.fullmatch(r"gem3d probe: CUDA_VISIBLE_DEVICES=\d+(,\d+)*", probe), probe
    for rule in [*EXPECTED_RULES, *GPU_RULES]:
        log = work / "results" / "demo" / "logs" / f"{rule}.log"
        values = CUDA_LINE.findall(log.read_text())
        assert values, f"{log}: no 'gem3d <stage>: CUDA_VISIBLE_DEVICES=' line"
        if rule in GPU_RULES:
            assert re.fullmatch(r"\d+(,\d+)*", values[0]), (rule, values)
        else:
            assert values[0] == "<unset>", (rule, values)

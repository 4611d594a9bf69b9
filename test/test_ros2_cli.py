"""The real ROS 2 command line against the colcon-installed package, as a user on a robot types it.

One system serves the checks: `ros2 launch segmerge_ros segmerge.launch.py` (random SegFormer-B0, the installed
params file) fed by `ros2 run segmerge_ros segmerge_camera` (vtest.avi at 96x128, 10 fps), then `ros2 param
get/set/describe`, `ros2 topic hz/echo/info`, and SIGINT to the whole launch (what Ctrl-C sends). Beside it, on a
domain of its own, `ros2 run segmerge_ros segmerge_node --ros-args --params-file config/segmerge.yaml`.

The CLI (launch, launch_ros, ros2cli) is installed into .venv by `make setup` from ../shared/ros2-jazzy-cli; without
that folder these tests skip. Every process is on localhost discovery and a domain id of this module's own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from segmerge_ros.ros.params import PARAMETERS

import colcon_workspace  # test/ helper: the session's one colcon build

REPO_ROOT = Path(__file__).resolve().parents[1]
ROS2_CLI_SOURCES = REPO_ROOT.parent / "shared" / "ros2-jazzy-cli"
VENV = Path(sys.executable).parent.parent
CONFIG = REPO_ROOT / "config" / "segmerge.yaml"
PROFILE_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"
# Valid Linux domain ids are 0..101 and 215..232; test_node* use 100..229, test_transport 230.
LAUNCH_DOMAIN_ID = 231
RUN_DOMAIN_ID = 232
NODE = "/segmerge"
CAMERA = "/cli_cam/image"
MASK = "/cli_cam/segmentation/mask"
LABELS = "/cli_cam/segmentation/labels"
SPEC = {spec.name: spec for spec in PARAMETERS}
# Without the daemon (nothing left running after the tests). Each command polls for the node for up to --timeout
# seconds, so its initial discovery spin (0.5 s by default, twice per `param` command) can be short.
FIND = ["--no-daemon", "--spin-time", "0.1", "--timeout", "20"]

pytestmark = pytest.mark.skipif(
    not ROS2_CLI_SOURCES.is_dir(),
    reason=f"no {ROS2_CLI_SOURCES}: the real ROS 2 CLI is installed from there (make setup)")


@dataclass
class Ros2:
    """`ros2` with the environment of a sourced colcon workspace on top of the activated .venv."""

    executable: Path
    env: dict[str, str]
    logs: Path
    install: Path

    def domain_env(self, domain_id: int, **extra: str) -> dict[str, str]:
        return {**self.env, "ROS_DOMAIN_ID": str(domain_id), **extra}

    def __call__(self, *args: str, domain_id: int = LAUNCH_DOMAIN_ID, timeout_s: float = 90.0,
                 ) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.executable), *args], env=self.domain_env(domain_id), capture_output=True,
                              text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=REPO_ROOT)

    def start(self, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
        """A long-running command in a process group of its own (signalled as a whole, like Ctrl-C in a shell)."""
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen([str(self.executable), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=REPO_ROOT, start_new_session=True)
        process.log_path = self.logs / f"{name}.log"
        log.close()
        return process


def interrupt(process: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGINT to the process group, as Ctrl-C; kills it if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"{process.args[:3]} did not exit within {timeout_s:.0f} s of SIGINT", pytrace=False)
    return process.returncode


@pytest.fixture(scope="module")
def ros2(tmp_path_factory) -> Ros2:
    executable = VENV / "bin" / "ros2"
    check = subprocess.run([sys.executable, "-c", "import launch_ros.actions, ros2param, ros2topic, ros2launch"],
                           capture_output=True, text=True)
    if not executable.exists() or check.returncode != 0:
        pytest.fail(f"the ROS 2 CLI is not installed in {VENV}: run `make setup` (it runs "
                    f"{ROS2_CLI_SOURCES}/install.sh {VENV})\n{check.stderr}", pytrace=False)
    install = colcon_workspace.colcon_install(tmp_path_factory)
    logs = tmp_path_factory.mktemp("ros2_cli")
    base = {k: v for k, v in os.environ.items() if k not in (PROFILE_VARIABLE, "RMW_IMPLEMENTATION")}
    base.update({
        # `. .venv/bin/activate` and AMENT_PREFIX_PATH as install.sh says, before sourcing the workspace.
        "VIRTUAL_ENV": str(VENV), "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
        "AMENT_PREFIX_PATH": str(VENV),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_LOG_DIR": str(logs / "ros_log"),
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
    })
    base.pop("COLCON_PREFIX_PATH", None)
    return Ros2(executable, colcon_workspace.sourced_environment(install, base), logs, install)


@dataclass
class System:
    launch: subprocess.Popen
    camera: subprocess.Popen
    run_node: subprocess.Popen


@pytest.fixture(scope="module")
def system(ros2, shared_data):
    video = shared_data / "opencv_samples" / "vtest.avi"
    assert video.is_file(), f"{video} missing"
    # Started together: their start-ups (torch, the model) overlap.
    launch = ros2.start("launch", "launch", "segmerge_ros", "segmerge.launch.py", f"image_topics:={CAMERA}",
                        "weights:=random", env=ros2.domain_env(LAUNCH_DOMAIN_ID))
    run_node = ros2.start("run_node", "run", "segmerge_ros", "segmerge_node", "--ros-args", "--params-file",
                          str(CONFIG.relative_to(REPO_ROOT)), "-p", "weights:=random",
                          env=ros2.domain_env(RUN_DOMAIN_ID))
    # The camera driver gets the package's Fast DDS profile, as the README tells users to do.
    prefix = ros2("pkg", "prefix", "segmerge_ros")
    assert prefix.returncode == 0, prefix.stderr
    profile = Path(prefix.stdout.strip()) / "share" / "segmerge_ros" / "config" / "fastdds.xml"
    camera = ros2.start("camera", "run", "segmerge_ros", "segmerge_camera", "--source", str(video), "--fps", "10",
                        "--resize", "96x128", "--loop", "--topic", CAMERA,
                        env=ros2.domain_env(LAUNCH_DOMAIN_ID, **{PROFILE_VARIABLE: str(profile)}))
    started = System(launch, camera, run_node)
    try:
        # Waits for the node to appear and answer (its model is built before it spins).
        ready = ros2("param", "get", "--no-daemon", "--spin-time", "0.1", "--timeout", "120", NODE, "merge_rate",
                     timeout_s=180)
        assert ready.returncode == 0 and "Double value is: 0.0" in ready.stdout, (
            f"{ready.stdout}{ready.stderr}\nlaunch log:\n{launch.log_path.read_text()}")
        yield started
    finally:
        for process in (camera, launch, run_node):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for domain_id in (LAUNCH_DOMAIN_ID, RUN_DOMAIN_ID):
            ros2("daemon", "stop", domain_id=domain_id)  # none should run (--no-daemon everywhere); make sure


def log_text(process: subprocess.Popen) -> str:
    return process.log_path.read_text()


def test_ros2_pkg_finds_the_colcon_install(ros2):
    prefix = ros2("pkg", "prefix", "segmerge_ros")
    assert prefix.returncode == 0, prefix.stderr
    assert Path(prefix.stdout.strip()) == ros2.install / "segmerge_ros"
    executables = ros2("pkg", "executables", "segmerge_ros")
    assert {"segmerge_ros segmerge_node", "segmerge_ros segmerge_camera"} <= set(executables.stdout.splitlines())


def test_launch_gives_the_node_the_packaged_fast_dds_profile_and_logs_it(ros2, system):
    profile = ros2.install / "segmerge_ros" / "share" / "segmerge_ros" / "config" / "fastdds.xml"
    log = log_text(system.launch)
    assert f"Fast DDS profile {profile}" in log
    pid = re.search(r"\[segmerge_node-\d+\]: process started with pid \[(\d+)\]", log)
    assert pid, log
    environ = Path(f"/proc/{pid.group(1)}/environ").read_bytes().split(b"\0")
    assert f"{PROFILE_VARIABLE}={profile}".encode() in environ


def test_ros2_param_set_and_get_merge_rate(ros2, system):
    result = ros2("param", "set", *FIND, NODE, "merge_rate", "0.6")
    assert result.returncode == 0 and "Set parameter successful" in result.stdout, result.stdout + result.stderr
    assert "Double value is: 0.6" in ros2("param", "get", *FIND, NODE, "merge_rate").stdout


def test_ros2_param_describe_shows_the_declared_range_and_read_only_flag(ros2, system):
    described = ros2("param", "describe", *FIND, NODE, "merge_rate", "autostart").stdout
    merge_rate, autostart = described.split("Parameter name: autostart")
    low, high = SPEC["merge_rate"].float_range
    assert "Type: double" in merge_rate
    assert f"Description: {SPEC['merge_rate'].description}" in merge_rate
    assert f"Min value: {low}" in merge_rate and f"Max value: {high}" in merge_rate
    assert "Read only: true" not in merge_rate
    assert SPEC["autostart"].read_only and "Read only: true" in autostart and "Type: boolean" in autostart


def test_ros2_param_set_out_of_range_is_refused(ros2, system):
    before = ros2("param", "get", *FIND, NODE, "merge_rate").stdout
    high = SPEC["merge_rate"].float_range[1]
    result = ros2("param", "set", *FIND, NODE, "merge_rate", str(high + 0.5))
    assert "Setting parameter failed" in result.stderr, result.stdout + result.stderr
    assert ros2("param", "get", *FIND, NODE, "merge_rate").stdout == before


def test_ros2_param_set_of_a_rebuild_parameter_on_an_active_node_is_refused_with_the_reason(ros2, system):
    result = ros2("param", "set", *FIND, NODE, "model", "segformer-b1")
    assert "Setting parameter failed" in result.stderr and "only while the node is unconfigured" in result.stderr, (
        result.stderr)
    assert "String value is: segformer-b0" in ros2("param", "get", *FIND, NODE, "model").stdout
    result = ros2("param", "set", *FIND, NODE, "autostart", "false")
    assert "Setting parameter failed" in result.stderr and "read-only" in result.stderr, result.stderr


def test_ros2_topic_hz_measures_the_mask(ros2, system):
    hz = subprocess.Popen([str(ros2.executable), "topic", "hz", MASK], env=ros2.domain_env(LAUNCH_DOMAIN_ID),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    time.sleep(6.0)  # hz reports once a second after its first two messages
    interrupt(hz)
    output = hz.stdout.read()
    rates = [float(r) for r in re.findall(r"average rate: ([0-9.]+)", output)]
    windows = [int(w) for w in re.findall(r"window: (\d+)", output)]
    assert rates and all(r > 0 for r in rates), output
    assert max(windows) >= 3, output
    assert "Traceback" not in output


def test_labels_are_latched(ros2, system):
    # Published at start-up, long before this subscriber exists. A transient-local reader matches only a
    # transient-local writer, so receiving anything at all proves the topic is latched.
    echo = ros2("topic", "echo", "--once", "--timeout", "20", "--no-daemon", "--qos-durability", "transient_local",
                "--qos-reliability", "reliable", "--field", "data", "--full-length", LABELS, "std_msgs/msg/String")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert '"classes"' in echo.stdout and '"palette"' in echo.stdout


def test_diagnostics_report_the_camera(ros2, system):
    echo = ros2("topic", "echo", "--once", "--timeout", "20", "--no-daemon", "--full-length", "/diagnostics",
                "diagnostic_msgs/msg/DiagnosticArray")
    assert echo.returncode == 0, echo.stdout + echo.stderr
    array = yaml.safe_load(echo.stdout.split("\n---")[0])
    ours = [s for s in array["status"] if s["name"].startswith("segmerge:")]
    assert [s["hardware_id"] for s in ours] == [CAMERA], array
    values = {kv["key"]: kv["value"] for kv in ours[0]["values"]}
    assert float(values["frames_in"]) > 0 and float(values["frames_out"]) > 0, values


def test_ros2_run_with_the_params_file_accepts_every_parameter(ros2, system):
    dump = ros2("param", "dump", "--no-daemon", "--spin-time", "0.1", "--timeout", "120", NODE,
                domain_id=RUN_DOMAIN_ID, timeout_s=180)
    assert dump.returncode == 0, dump.stdout + dump.stderr
    node_values = yaml.safe_load(dump.stdout)[NODE]["ros__parameters"]
    expected = yaml.safe_load(CONFIG.read_text())["/**/segmerge"]["ros__parameters"]
    expected["weights"] = "random"  # given with -p: the file leaves it for the user to set
    for name, value in expected.items():
        got = node_values
        for part in name.split("."):  # the dump nests dotted names
            got = got[part]
        assert got == value and type(got) is type(value), name
    assert interrupt(system.run_node) == 0
    log = log_text(system.run_node)
    assert "Traceback" not in log and "FATAL" not in log and "ERROR" not in log, log


def lifecycle(ros2: Ros2, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """`ros2 lifecycle ...`, retried while discovery has not found the node yet."""
    end = time.monotonic() + timeout_s
    while True:
        result = ros2("lifecycle", *args, "--no-daemon", "--spin-time", "0.5", timeout_s=120)
        if "Node not found" not in result.stdout + result.stderr or time.monotonic() > end:
            return result
        time.sleep(0.5)


def test_ros2_lifecycle_moves_the_launched_node_through_its_states(ros2, system, shared_data, tmp_path):
    """`ros2 launch ... autostart:=false`, then `ros2 lifecycle set` as a user (or a lifecycle manager) does: a
    configure with a missing checkpoint fails with the reason and is retried after `ros2 param set`, without a
    restart; masks flow only while active."""
    node, camera_topic, mask = "/lc/segmerge", "/lc_cam/image", "/lc_cam/segmentation/mask"
    missing = tmp_path / "missing.safetensors"
    # The package's parameter file with the eager backend: this test is about the lifecycle (backend auto would spend
    # most of it timing and compiling OpenVINO on the first frame; the launch test above runs the defaults).
    params = yaml.safe_load(CONFIG.read_text())
    params["/**/segmerge"]["ros__parameters"].update(backend="eager", precision="fp32")
    params_file = tmp_path / "segmerge_eager.yaml"
    params_file.write_text(yaml.safe_dump(params))
    launch = ros2.start("lifecycle_launch", "launch", "segmerge_ros", "segmerge.launch.py", "namespace:=lc",
                        f"image_topics:={camera_topic}", f"weights:={missing}", "autostart:=false",
                        f"params_file:={params_file}", env=ros2.domain_env(LAUNCH_DOMAIN_ID))
    camera = ros2.start("lifecycle_camera", "run", "segmerge_ros", "segmerge_camera", "--source",
                        str(shared_data / "opencv_samples" / "vtest.avi"), "--fps", "10", "--resize", "96x128",
                        "--loop", "--topic", camera_topic, env=ros2.domain_env(LAUNCH_DOMAIN_ID))

    def echo_mask(timeout: str) -> subprocess.CompletedProcess:
        return ros2("topic", "echo", "--once", "--timeout", timeout, "--no-daemon", "--field", "header", mask,
                    "sensor_msgs/msg/Image", timeout_s=120)

    try:
        assert "unconfigured" in lifecycle(ros2, "get", node).stdout
        failed = lifecycle(ros2, "set", node, "configure")
        assert "Transitioning failed" in failed.stderr, failed.stdout + failed.stderr
        assert "cannot load weights" in log_text(launch) and "unconfigured" in lifecycle(ros2, "get", node).stdout
        assert "Set parameter successful" in ros2("param", "set", *FIND, node, "weights", "random").stdout

        configured = lifecycle(ros2, "set", node, "configure")
        assert "Transitioning successful" in configured.stdout, configured.stdout + configured.stderr
        assert "inactive" in lifecycle(ros2, "get", node).stdout
        refused = ros2("param", "set", *FIND, node, "model", "segformer-b1")
        assert "Setting parameter failed" in refused.stderr and "unconfigured" in refused.stderr, refused.stderr
        assert "stamp" not in echo_mask("5").stdout, "masks from an inactive node"

        assert "Transitioning successful" in lifecycle(ros2, "set", node, "activate").stdout
        assert "stamp" in echo_mask("60").stdout, f"no mask while active\n{log_text(launch)}"

        assert "Transitioning successful" in lifecycle(ros2, "set", node, "deactivate").stdout
        time.sleep(1.0)
        assert "stamp" not in echo_mask("5").stdout, "masks after deactivate"
        assert "Transitioning successful" in lifecycle(ros2, "set", node, "cleanup").stdout
        assert "unconfigured" in lifecycle(ros2, "get", node).stdout
    finally:
        interrupt(camera)
        assert interrupt(launch) == 0, log_text(launch)
    log = log_text(launch)
    assert "Traceback" not in log and "frame failed" not in log, log


def test_sigint_stops_the_launch_cleanly(ros2, system):
    """Last: Ctrl-C on `ros2 launch` (SIGINT to its process group) stops the node with exit code 0."""
    assert interrupt(system.camera) == 0
    assert system.launch.poll() is None, log_text(system.launch)
    assert interrupt(system.launch) == 0
    log = log_text(system.launch)
    assert re.search(r"\[INFO\] \[segmerge_node-\d+\]: process has finished cleanly", log), log
    assert "Traceback" not in log and "ERROR" not in log and "frame failed" not in log, log

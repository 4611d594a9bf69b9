"""Start segmerge_node (and RViz on request).

    ros2 launch segmerge_ros segmerge.launch.py image_topics:=/camera/image_raw use_rviz:=true
    ros2 launch segmerge_ros segmerge.launch.py image_topics:="[/left/image_raw, /right/image_raw/compressed]"
    ros2 launch segmerge_ros segmerge.launch.py params_file:=/path/to/my.yaml namespace:=robot1

Arguments:
  image_topics  camera topic(s): one name, or a list "[a, b]" / "a,b"; empty (default) = the params file's value
  params_file   parameters (default: the installed config/segmerge.yaml)
  namespace     namespace for the node; relative image topics and all outputs live in it (default: none)
  use_rviz      also start rviz2 with config/segmerge.rviz (default: false)
  autostart     configure and activate at start (default: the params file's, true); false leaves the managed node
                unconfigured for a lifecycle manager or `ros2 lifecycle set /segmerge configure`, then `activate`
  hri           REP-155 bodies on /humans/bodies/* (needs hri_msgs); empty (default) = the params file's hri.enable

Fast DDS: unless FASTRTPS_DEFAULT_PROFILES_FILE is already set, the node (and RViz) get the installed
config/fastdds.xml, whose large shared-memory segment lets raw frames of up to 1920x1080 arrive. The segment that
carries a frame is the publisher's: start camera drivers with the same variable. The profile used is logged. It is
given to these two processes only (their own environment), never to the launch context: a launch file that
includes this one keeps its own processes' environment.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "segmerge_ros"
PROFILE_VARIABLE = "FASTRTPS_DEFAULT_PROFILES_FILE"


def parse_topics(text):
    """'a' -> ['a']; '[a, b]' or 'a,b' -> ['a', 'b']; '' -> [] (keep the params file's image_topics)."""
    return [t.strip().strip("'\"") for t in text.strip().strip("[]").split(",") if t.strip().strip("'\"")]


def fastdds_profile(environment, default_profile):
    """(profile, chosen_by_user): the user's FASTRTPS_DEFAULT_PROFILES_FILE when set, else the package's profile."""
    chosen = environment.get(PROFILE_VARIABLE, "")
    return (chosen, True) if chosen else (default_profile, False)


def _fastdds_profile(context, default_profile):
    """(log line, environment for our processes): the package's profile only where the user set none."""
    profile, chosen_by_user = fastdds_profile(context.environment, default_profile)
    rmw = context.environment.get("RMW_IMPLEMENTATION", "")
    if rmw and not rmw.startswith("rmw_fastrtps"):
        return LogInfo(msg=f"segmerge: RMW_IMPLEMENTATION={rmw}: the Fast DDS profile {profile} does not apply"), {}
    if chosen_by_user:
        return LogInfo(msg=f"segmerge: Fast DDS profile {profile} ({PROFILE_VARIABLE} from the environment)"), {}
    return (LogInfo(msg=f"segmerge: Fast DDS profile {profile} (the package's; start camera drivers with "
                        f"{PROFILE_VARIABLE}={profile} too, raw frames travel in the publisher's shared memory)"),
            {PROFILE_VARIABLE: profile})


def _segmerge_processes(context, default_profile, rviz_config):
    log, environment = _fastdds_profile(context, default_profile)
    parameters = [LaunchConfiguration("params_file").perform(context)]
    topics = parse_topics(LaunchConfiguration("image_topics").perform(context))
    if topics:
        parameters.append({"image_topics": topics})
    weights = LaunchConfiguration("weights").perform(context)
    if weights:
        parameters.append({"weights": weights})
    for argument, parameter in (("autostart", "autostart"), ("hri", "hri.enable")):
        value = LaunchConfiguration(argument).perform(context).strip().lower()
        if value:
            if value not in ("true", "false"):
                raise ValueError(f"launch argument {argument}:={value!r}: use true or false")
            parameters.append({parameter: value == "true"})
    return [
        log,
        Node(
            package=PACKAGE,
            executable="segmerge_node",
            name="segmerge",
            namespace=LaunchConfiguration("namespace"),
            parameters=parameters,
            additional_env=environment,
            output="screen",
            emulate_tty=True,
        ),
        Node(
            package="rviz2",
            executable="rviz2",
            name="segmerge_rviz",
            namespace=LaunchConfiguration("namespace"),
            arguments=["-d", rviz_config],
            additional_env=environment,
            condition=IfCondition(LaunchConfiguration("use_rviz")),
            output="screen",
        ),
    ]


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    default_params = os.path.join(share, "config", "segmerge.yaml")
    rviz_config = os.path.join(share, "config", "segmerge.rviz")
    default_profile = os.path.join(share, "config", "fastdds.xml")
    return LaunchDescription([
        DeclareLaunchArgument("image_topics", default_value="",
                              description="camera topic(s): 'a', '[a, b]' or 'a,b'; empty = the params file's"),
        DeclareLaunchArgument("weights", default_value="",
                              description="checkpoint (hub folder, .safetensors or .pth), or 'random'; empty = the "
                                          "params file's (the node refuses none at all)"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="segmerge_node parameters (YAML)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace for segmerge_node"),
        DeclareLaunchArgument("use_rviz", default_value="false", description="also start rviz2"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="true/false: configure and activate at start; empty = the params file's"),
        DeclareLaunchArgument("hri", default_value="",
                              description="true/false: REP-155 bodies (hri.enable); empty = the params file's"),
        OpaqueFunction(function=_segmerge_processes, args=[default_profile, rviz_config]),
    ])

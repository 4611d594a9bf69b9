"""Process helpers of apps/client.py that need no running node."""

from __future__ import annotations

from pathlib import Path

from segmerge_ros.apps.client import FASTDDS_PROFILE_VARIABLE, package_fastdds_profile, ros_args, with_fastdds_profile


def test_the_package_profile_is_used_unless_the_user_set_one():
    profile = package_fastdds_profile()
    assert profile is not None and profile.name == "fastdds.xml" and "<profiles" in Path(profile).read_text()
    env, used, by_user = with_fastdds_profile({"ROS_DOMAIN_ID": "7"})
    assert (env[FASTDDS_PROFILE_VARIABLE], used, by_user) == (str(profile), str(profile), False)
    assert env["ROS_DOMAIN_ID"] == "7"
    mine = {FASTDDS_PROFILE_VARIABLE: "/etc/my_fastdds.xml"}
    assert with_fastdds_profile(mine) == (mine, "/etc/my_fastdds.xml", True)


def test_ros_args_keep_types():
    assert ros_args({"budget.mode": "off", "merge_rate": 0.0, "image_topics": ["/a/image"]}) == [
        "--ros-args", "-p", 'budget.mode:="off"', "-p", "merge_rate:=0.0", "-p", 'image_topics:=["/a/image"]']

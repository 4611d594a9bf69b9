"""ament_python packaging for segmerge_ros (colcon build) that also installs with pip (pip install -e .)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "segmerge_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        # Globs, so launch and config files added later are installed without touching this file.
        (f"share/{PACKAGE}/launch", sorted(glob("launch/*.launch.py"))),
        (f"share/{PACKAGE}/config", sorted(glob("config/*.yaml") + glob("config/*.rviz") + glob("config/*.xml"))),
        # the pose student the package ships (pose.weights empty), with its README
        (f"share/{PACKAGE}/weights", sorted(glob("weights/*.safetensors") + glob("weights/*.md"))),
    ],
    # Unbounded on purpose: requirements.txt pins the tested versions; bounds here would fight those pins.
    install_requires=["numpy", "opencv-python-headless", "safetensors", "torch"],
    # TensorRT engines on CUDA machines and Jetsons (NVIDIA builds of torch-tensorrt matching the torch there);
    # fleet: segmerge-bag --workers N on Ray (requirements-fleet.txt pins the tested version).
    extras_require={"tensorrt": ["torch-tensorrt"], "fleet": ["ray"]},
    zip_safe=True,
    maintainer="segmerge maintainers",
    maintainer_email="segmerge@example.com",
    description="SegFormer semantic segmentation with token merging as a ROS 2 node.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "segmerge_node = segmerge_ros.ros.node:main",
            "segmerge_camera = segmerge_ros.apps.camera_node:main",
            "segmerge-bench = segmerge_ros.bench.bench:main",
            "segmerge-demo = segmerge_ros.apps.offline_demo:main",
            "segmerge-train = segmerge_ros.training.cli:main",
            "segmerge-build-engines = segmerge_ros.apps.build_engines:main",
            "segmerge-bag = segmerge_ros.apps.bag:main",
        ],
    },
)

# Developer entry points. `make test` and `make demo` work on a fresh clone: they create .venv first.
# pip's index settings (extra indexes, find-links) come from the machine's pip configuration.

# The ROS 2 Jazzy wheels are built for CPython 3.11 only.
PYTHON ?= $(shell command -v python3.11 || echo python3)
VENV := .venv
VPY := $(VENV)/bin/python
# Re-run the (slow) install only when a requirement or packaging file changes.
STAMP := $(VENV)/.segmerge-setup.stamp
# The real ROS 2 command line (ros2 launch/param/topic/run) from the Jazzy sources in ../shared, where it exists;
# test/test_ros2_cli.py uses it (and skips, saying why, without ../shared).
ROS2_CLI := ../shared/ros2-jazzy-cli
# vision_msgs and hri_msgs (not on PyPI) built from their Jazzy sources in ../shared: the node's detections,
# label_info and REP-155 outputs; without them those outputs are left out (hri.enable fails at configure).
ROS2_MSGS := ../shared/ros2-msgs
SETUP_INPUTS := requirements.txt requirements-test.txt requirements-fleet.txt requirements-nodeps.txt setup.py setup.cfg \
	package.xml \
	$(wildcard $(ROS2_CLI)/install.sh $(ROS2_CLI)/sources.tgz $(ROS2_MSGS)/install.sh $(ROS2_MSGS)/sources.tgz)

TESTS ?= test
PYTEST_FLAGS ?= -q
DEMO_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup test demo bench clean distclean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	# Ray (the fleet extra, optional at run time) with them: test/test_bag_fleet.py runs segmerge-bag on it.
	$(VPY) -m pip install -r requirements.txt -r requirements-test.txt -r requirements-fleet.txt
	$(VPY) -m pip install --no-deps -r requirements-nodeps.txt
	# Editable, so console scripts land in .venv/bin and source edits need no reinstall.
	$(VPY) -m pip install --no-deps --no-build-isolation -e .
	# After the pip installs (it needs rclpy); a no-op when its sources are already installed.
	@if [ -f $(ROS2_CLI)/install.sh ]; then bash $(ROS2_CLI)/install.sh $(VENV); \
	else echo "no $(ROS2_CLI): the ros2 CLI tests will skip"; fi
	@if [ -f $(ROS2_MSGS)/install.sh ]; then bash $(ROS2_MSGS)/install.sh $(VENV); \
	else echo "no $(ROS2_MSGS): no vision_msgs/hri_msgs (detections, label_info and REP-155 outputs left out)"; fi
	touch $@

# Keep DDS discovery on this host: tests must not see (or disturb) other machines' ROS graphs.
test: export ROS_AUTOMATIC_DISCOVERY_RANGE = LOCALHOST
test: setup
	$(VPY) -m pytest $(PYTEST_FLAGS) $(TESTS)

# The main job: the node and a camera over DDS on a real video. Without ../shared/data (and no --source in
# DEMO_ARGS) the video comes from Debian's opencv-doc, installed here when missing and possible.
demo: export ROS_AUTOMATIC_DISCOVERY_RANGE = LOCALHOST
demo: setup
	@$(VPY) -c "from segmerge_ros.inference.sources import default_video as v; raise SystemExit(v() is None)" \
		|| echo "$(DEMO_ARGS)" | grep -q -- "--source" \
		|| (echo "no demo video found: installing Debian's opencv-doc (vtest.avi)"; \
		    ($$(command -v sudo) apt-get update -qq && $$(command -v sudo) apt-get install -y -qq opencv-doc) \
		    || echo "could not install opencv-doc: pass DEMO_ARGS='--source VIDEO_OR_FOLDER'")
	$(VPY) -m segmerge_ros.apps.demo $(DEMO_ARGS)

bench: setup
	$(VPY) -m segmerge_ros.bench.bench $(BENCH_ARGS)  # not bin/: a re-run of setup installs scripts the ament way (lib/segmerge_ros)

# Build outputs and caches; keeps .venv (see distclean).
clean:
	rm -rf build install log .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

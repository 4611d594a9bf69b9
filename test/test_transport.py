"""config/fastdds.xml: raw rgb8 frames that arrive between two processes over best-effort sensor-data QoS.

With Fast DDS's defaults (a 0.5 MB shared-memory segment) most large raw frames are lost; `python
test/transport_probe.py` prints the table with and without the profile. Here: the profile is what the README says it
is, Fast DDS loads it without complaint, and 1280x720 and 1024x512 rgb8 at 15 Hz arrive (>= 90 %, every byte right).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

import transport_probe  # test/ helper: the sender and receiver processes

NS = {"p": "http://www.eprosima.com/XMLSchemas/fastRTPS_Profiles"}
FRAMES = 60
FPS = 15.0
MIN_DELIVERED = 0.9
FULL_HD_RGB8 = 1920 * 1080 * 3


def test_profile_gives_every_process_a_large_shared_memory_segment_and_keeps_udp():
    root = ET.parse(transport_probe.PROFILE).getroot()
    transports = {d.findtext("p:transport_id", namespaces=NS): d
                  for d in root.findall("p:transport_descriptors/p:transport_descriptor", NS)}
    kinds = {name: d.findtext("p:type", namespaces=NS) for name, d in transports.items()}
    assert sorted(kinds.values()) == ["SHM", "UDPv4"]
    shm = next(d for d in transports.values() if d.findtext("p:type", namespaces=NS) == "SHM")
    # A 1080p camera frame and the node's outputs for it (overlay rgb8, mask and confidence mono8) at once.
    assert int(shm.findtext("p:segment_size", namespaces=NS)) >= 2 * FULL_HD_RGB8 + 2 * 1920 * 1080
    defaults = [p for p in root.findall("p:participant", NS) if p.get("is_default_profile") == "true"]
    assert len(defaults) == 1, "exactly one default participant profile (the one Fast DDS applies to every node)"
    rtps = defaults[0].find("p:rtps", NS)
    assert rtps.findtext("p:useBuiltinTransports", namespaces=NS) == "false"
    used = [t.text for t in rtps.findall("p:userTransports/p:transport_id", NS)]
    assert sorted(used) == sorted(transports)


def test_fast_dds_loads_the_profile_without_errors(tmp_path):
    assert transport_probe.FAST_DDS_ERROR not in transport_probe.fastdds_output(
        transport_probe.PROFILE, transport_probe.TABLE_DOMAIN_ID)
    # The same check sees a profile Fast DDS cannot use (it would carry on silently with its defaults).
    broken = tmp_path / "fastdds.xml"
    broken.write_text(transport_probe.PROFILE.read_text().replace("segment_size>", "segment_bytes>"))
    assert "segment_bytes" in broken.read_text()
    output = transport_probe.fastdds_output(broken, transport_probe.TABLE_DOMAIN_ID)
    assert transport_probe.FAST_DDS_ERROR in output and "XMLPARSER" in output


@pytest.mark.parametrize("size", [(720, 1280), (512, 1024)], ids=["1280x720", "1024x512"])
def test_raw_rgb8_frames_at_15_hz_arrive_with_the_profile(size):
    result = transport_probe.measure(size, FRAMES, FPS, transport_probe.PROFILE, transport_probe.TABLE_DOMAIN_ID)
    print(f"{size[1]}x{size[0]} rgb8 with config/fastdds.xml: {result.received}/{result.sent} frames")
    assert result.sent == FRAMES
    assert result.damaged == 0
    assert result.ratio >= MIN_DELIVERED, f"only {result.received} of {result.sent} frames arrived whole"

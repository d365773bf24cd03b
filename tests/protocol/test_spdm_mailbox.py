"""SPDM through the device's DOE mailbox in config space, over vfio-user REGION_READ/WRITE:
the device security manager (vfio_user_dev/dsm.py) answers GET_VERSION and
GET_CAPABILITIES the way Linux's DOE driver and the guest agent's client send them, and
the TSM's full requester runs over the same mailbox."""

from __future__ import annotations

import time

import pytest

from guest_agent import spdm_probe
from guest_agent.doe import DoeMailboxClient
from guest_agent.selftest import Checks
from teeio import pki
from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DoeObject, pad_dw
from teeio.measurements import DmtfValueType, MeasurementSource
from teeio.spdm import Requester, codec
from teeio.spdm.defs import SPDM_VERSION_12, SPDM_VERSION_13, KeyUpdateOp
from teeio.spdm.responder import DEFAULT_FLAGS, ResponderConfig
from tests.support.linux_doe import STATUS, LinuxDoe, VfioConfig
from tests.support.lockstep import CONFIG
from tests.support.servers import RunningServer
from vfio_user_dev.client import Client
from vfio_user_dev.device import DOE_CAP
from vfio_user_dev.dsm import DeviceSecurityManager

pytestmark = pytest.mark.timeout(30)

SPDM = (PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM)
SECURED = (PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM)
MEASUREMENTS = (
    MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"firmware code"),
    MeasurementSource(3, DmtfValueType.VERSION, b"teeio-fw 1.0.0", as_digest=False),
)


@pytest.fixture(autouse=True)
def dsm(server: RunningServer, identity: pki.Identity) -> DeviceSecurityManager:
    """Every test here talks to the device's DSM (attached before ``c`` connects)."""
    manager = DeviceSecurityManager(identity, MEASUREMENTS, name="dsm")
    manager.attach(server.device.doe)
    return manager


def test_discovery_lists_both_spdm_protocols(server: RunningServer, c: Client) -> None:
    linux = LinuxDoe(c, DOE_CAP)
    linux.abort()
    assert linux.cache_features() == [(1, 0), SPDM, SECURED]
    assert server.machine.stats()["doe_protocols"] == ["0001:00", "0001:01", "0001:02"]


def test_linux_style_get_version_and_get_capabilities(c: Client) -> None:
    """pci_doe() requests, as an in-kernel CMA user would send them (DW-padded)."""
    linux = LinuxDoe(c, DOE_CAP)
    linux.abort()
    raw = linux.doe(*SPDM, codec.GetVersion().encode(), 64)
    version = codec.Version.decode(raw, pad=True)
    assert [e >> 8 for e in version.entries] == [SPDM_VERSION_12, SPDM_VERSION_13]
    assert raw == pad_dw(bytes.fromhex("10040000" "00" "02" "0012" "0013"))   # 10 + 2 pad
    req = codec.GetCapabilities(SPDM_VERSION_13, ct_exponent=0, flags=spdm_probe.REQUESTER_FLAGS,
                                data_transfer_size=4096, max_spdm_msg_size=4096).encode()
    caps = codec.Capabilities.decode(linux.doe(*SPDM, req, 20), pad=True)
    cfg = ResponderConfig()
    assert (caps.version, caps.flags, caps.ct_exponent) == (SPDM_VERSION_13, DEFAULT_FLAGS,
                                                            cfg.ct_exponent)
    assert (caps.data_transfer_size, caps.max_spdm_msg_size) == (cfg.data_transfer_size,
                                                                 cfg.max_spdm_msg_size)


def test_guest_agent_probe_through_config_space(c: Client) -> None:
    """The hand-encoded messages of the guest's spdm-probe mode, on the same mailbox."""
    mb = DoeMailboxClient.find(VfioConfig(c))
    mb.abort()
    checks = Checks()
    out = spdm_probe.probe(spdm_probe.SpdmOverDoe(mb), checks)
    assert checks.ok, checks.items
    assert out["version"]["entries"] == ["1.2", "1.3"]
    caps = out["capabilities"]
    assert caps["version"] == "1.3"
    assert int(caps["flags"], 16) == DEFAULT_FLAGS
    assert set(caps["flag_names"]) >= {"CERT_CAP", "CHAL_CAP", "MEAS_CAP_SIG", "KEY_EX_CAP"}
    assert caps["data_transfer_size"] == 4096
    # out of order: CAPABILITIES again without GET_VERSION -> the responder's ERROR
    with pytest.raises(spdm_probe.SpdmProbeError, match="ERROR response, code 0x04"):
        spdm_probe.parse_capabilities(
            spdm_probe.SpdmOverDoe(mb).call(spdm_probe.get_capabilities_request(0x13)), 0x13)
    assert c.read32(CONFIG, STATUS) & 0x80000005 == 0   # not Ready, Error or Busy


def test_full_requester_over_the_mailbox(c: Client, identity: pki.Identity) -> None:
    """The TSM's requester, objects carried by the config-space mailbox (0001:01, 0001:02)."""
    mb = DoeMailboxClient.find(VfioConfig(c))
    mb.abort()

    def send(doe_type: int, payload: bytes) -> bytes:
        rsp = mb.exchange_object(DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload)))
        return b"" if rsp is None else rsp.payload

    req = Requester(send, [identity.root], name="tsm")
    req.init_connection()
    req.get_digests()
    req.get_certificate(0)
    result = req.get_measurements()
    assert [(b.index, b.raw) for b in result.blocks] == [(1, False), (3, True)]
    assert result.blocks[1].value == b"teeio-fw 1.0.0"
    sid = req.start_session()
    req.heartbeat(sid)
    req.key_update(sid, KeyUpdateOp.UpdateAllKeys)
    inside = req.get_measurements(signed=False, session_id=sid)
    assert inside.blocks == result.blocks
    req.end_session(sid)


def test_secured_object_for_no_session_gets_no_response(c: Client) -> None:
    mb = DoeMailboxClient(VfioConfig(c), DOE_CAP, timeout=0.2)
    mb.abort()
    t0 = time.monotonic()
    assert mb.exchange_object(DoeObject(*SECURED, bytes(16))) is None   # dropped
    assert time.monotonic() - t0 < 2
    assert mb.discover() == [(1, 0), SPDM, SECURED]   # the mailbox still works

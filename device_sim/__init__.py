"""The simulated scanner fleet: devices from ``gateway.catalog``, each its own MQTT 5 client.

``make_fleet`` names the devices, ``PayloadFactory`` says what an honest device sends, ``Fleet`` puts
them on a broker and returns the ``GroundTruth`` of what was acknowledged; firmware profiles
(``FirmwareProfile``, default ``Honest``) are the seam for hostile devices. Nothing here imports the
gateway's runtime: the simulator sees the gateway only through the broker.
"""

from device_sim.devices import DeviceSpec, PayloadFactory, encode, image_bytes, make_fleet
from device_sim.firmware import HONEST, FirmwareProfile, Honest, Outgoing
from device_sim.fleet import MOBILE_TYPE, Fleet
from device_sim.truth import FailedRecord, GroundTruth, Outage, SentRecord

__all__ = [
    "DeviceSpec",
    "PayloadFactory",
    "make_fleet",
    "encode",
    "image_bytes",
    "FirmwareProfile",
    "Honest",
    "HONEST",
    "Outgoing",
    "Fleet",
    "MOBILE_TYPE",
    "GroundTruth",
    "SentRecord",
    "FailedRecord",
    "Outage",
]

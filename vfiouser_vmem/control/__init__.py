"""The control plane: QMP (framing, commands, events; a client), the human
monitor (HMP) and the QOM tree they share, and metrics.

It knows devices only through ``ControlledDevice`` (QMP) and the
attributes ``MetricsExporter`` reads, so that it is tested with fakes; the
server layer above adapts its devices to them.  This layer may import the
virtio-mem device and the layers below it (docs/architecture.md).
"""

from vfiouser_vmem.control._client import QmpClient
from vfiouser_vmem.control._hmp import HumanMonitor
from vfiouser_vmem.control._metrics import MetricsExporter, parse_metrics_address
from vfiouser_vmem.control._monitor import MonitorServer
from vfiouser_vmem.control._protocol import ControlledDevice
from vfiouser_vmem.control._qmp import QEMU_VERSION, QmpServer
from vfiouser_vmem.control._qom import QomTree

__all__ = ["QEMU_VERSION", "ControlledDevice", "HumanMonitor", "MetricsExporter", "MonitorServer", "QmpClient",
           "QmpServer", "QomTree", "parse_metrics_address"]

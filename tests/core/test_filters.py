"""iotrace.core.filters: one filter for top and report, applied to key columns."""
import numpy as np
import pytest

from iotrace.core.events import DIR_READ, DIR_WRITE, TYPE_MMIO, TYPE_PIO
from iotrace.core.filters import FilterError, make_filter

NAMES = ["com1", "ide-primary", "vga-lowmem", "other"]
# rows: domid, vcpu, type, dir, range index
ROWS = np.array([(3, 0, TYPE_PIO, DIR_WRITE, 0), (3, 1, TYPE_PIO, DIR_READ, 1),
                 (3, -1, TYPE_MMIO, DIR_WRITE, 2), (5, 0, TYPE_PIO, DIR_READ, 3),
                 (14, 2, TYPE_PIO, DIR_READ, 1)])


def selected(**kw):
    f = make_filter(**kw)
    return np.flatnonzero(f.mask(*ROWS.T, NAMES, {3: "web", 5: "db"})).tolist()


@pytest.mark.parametrize("kw, rows", [
    ({}, [0, 1, 2, 3, 4]),
    ({"domains": ["web"]}, [0, 1, 2]),
    ({"domains": ["5"]}, [3]),
    ({"domains": ["dom1?"]}, [4]),                      # unnamed: its display name
    ({"domains": ["w*,db"]}, [0, 1, 2, 3]),
    ({"vcpus": ["-1"]}, [2]),
    ({"types": ["mmio"]}, [2]),
    ({"dirs": ["read"]}, [1, 3, 4]),
    ({"dirs": ["w"], "types": ["pio"]}, [0]),
    ({"ranges": ["ide-*", "oth?r"]}, [1, 3, 4]),
    ({"domains": ["nosuch"]}, []),
])
def test_mask(kw, rows):
    assert selected(**kw) == rows


def test_describe_and_errors():
    f = make_filter(domains=["web"], dirs=["write"], types=["pio"])
    assert f.describe() == "domain=web type=pio dir=write" and f.active()
    with pytest.raises(FilterError, match="dir: expected read or write, got 'up'"):
        make_filter(dirs=["up"])

"""Domain names: xenstore first, then the device model's -name, then dom<N>.

There is no xenstored on these machines, so the real ``xenstore-read`` fails and the fallbacks are
what a Dom0 whose xenstore is unreachable would show."""
from iotrace.core import domains


def test_fallbacks_without_a_running_xenstore():
    assert domains.xenstore_name(7) is None
    assert domains.domain_name(7, "web") == "web"
    assert domains.domain_name(7) == "dom7"
    assert domains.xenstore_name(-1) is None


def test_probes_and_xentrace_share_the_lookup():
    from iotrace.probes import discovery
    assert discovery.domain_name is domains.domain_name

"""One real control plane (etcd + kube-apiserver on loopback, from tests/tools/control-plane.sh)
for the whole end-to-end session, with the CRDs installed."""

from __future__ import annotations

import pathlib
import shutil
import tempfile

import pytest

from cluster import ROOT, ControlPlane


@pytest.fixture(scope="session")
def control_plane():
    d = pathlib.Path(tempfile.mkdtemp(prefix="airouter-cp-"))
    cp = ControlPlane.start(d)
    try:
        cp.kubectl("apply", "--server-side", "-f", str(ROOT / "charts" / "airouter" / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "crd/credentials.airouter.dev",
                   "crd/routerpools.airouter.dev", "--timeout=60s")
        yield cp
    finally:
        cp.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def kubectl(control_plane):
    """kubectl against the session's API server (admin)."""
    return control_plane.kubectl

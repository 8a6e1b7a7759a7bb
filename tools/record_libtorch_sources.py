#!/usr/bin/env python3
"""Writes inst/libtorch/sources.csv: the official PyTorch wheels on PyPI that
carry libtorch 2.11.0 (and the NVIDIA libraries it links to), with the SHA-256
checksums PyPI publishes. install_libtorch() and configure download these and
check each file against the recorded checksum.

The versions are those pip resolved for torch==2.11.0 in the venv of
tools/setup_torch.sh. Run it again (a maintainer, with network) when the
libtorch version changes:  python3 tools/record_libtorch_sources.py
"""
import glob, json, os, re, sys, urllib.request

WANT = "2.11.0"
HOME = os.environ.get("SCDISTILL_HOME", os.path.expanduser("~/.local/share/scdistill"))
SITE = glob.glob(f"{HOME}/torch-{WANT}/lib/python3*/site-packages")[0]

def installed(dist):
    """The version of a distribution installed in the setup venv."""
    norm = dist.replace("-", "_")
    hits = glob.glob(f"{SITE}/{norm}-*.dist-info")
    if not hits:
        sys.exit(f"{dist} is not installed in {SITE}")
    return re.match(rf"{norm}-(.+)\.dist-info", os.path.basename(hits[0])).group(1)

def pypi_file(dist, version, pattern):
    req = urllib.request.Request(f"https://pypi.org/simple/{dist}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
    for f in files:
        name = f["filename"]
        if f"-{version}-" in name and re.search(pattern, name):
            return f["url"], f["hashes"]["sha256"]
    sys.exit(f"no {dist} {version} file matching {pattern} on PyPI")

# libtorch_cpu in these wheels links the CUDA runtime and CUPTI, so the CPU
# install needs those two small libraries too; CUDA needs the rest.
CPU = ["nvidia-cuda-runtime", "nvidia-cuda-cupti"]
CUDA = CPU + ["nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile",
              "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13",
              "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx"]

rows = []
torch = pypi_file("torch", WANT, r"-cp312-cp312-manylinux_2_28_x86_64\.whl$")
for typ, deps in (("cpu", CPU), ("cuda", CUDA)):
    rows.append((typ, "linux-x86_64", "torch", *torch))
    for d in deps:
        rows.append((typ, "linux-x86_64", d, *pypi_file(d, installed(d), r"x86_64\.whl$")))

out = os.path.join(os.path.dirname(__file__), "..", "inst", "libtorch", "sources.csv")
with open(out, "w") as f:
    f.write(f"# libtorch {WANT}: official PyTorch wheels on PyPI and the SHA-256 PyPI publishes for each.\n")
    f.write("# Written by tools/record_libtorch_sources.py; read by R/libtorch.R.\n")
    f.write("type,platform,part,url,sha256\n")
    for r in rows:
        f.write(",".join(r) + "\n")
print(f"wrote {out}: {len(rows)} files")

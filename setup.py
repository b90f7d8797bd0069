"""itune: instruction tuning of language models in JAX.

All dependency pins live here. The core pins are the stack verified together on Linux x86_64 /
CPython 3.11 (TensorFlow, JAX and protobuf resolve cleanly only at these versions).
"""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "sentencepiece==0.2.3",
    # CPU build: the input pipeline never needs TensorFlow's accelerator kernels.
    "tensorflow-cpu==2.21.0",
    "tensorflow-datasets==4.9.10",
    # tensorflow-datasets 4.9.10 imports it without declaring it (tensorflow/datasets#11212).
    "importlib_resources==7.1.0",
    "ml-collections==1.1.0",
    "tensorboard==2.21.0",
    # The version at which TensorFlow's and JAX's protobuf requirements meet.
    "protobuf==7.36.2",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "tqdm>=4.66",
    # Hugging Face byte-level BPE tokenizers (vocab.json + merges.txt, tokenizer.json); the range
    # transformers 5.x accepts.
    "tokenizers==0.23.3",
    # Reading and writing Hugging Face checkpoints, and reading GGUF files (itune.convert).
    "safetensors==0.8.0",
    "gguf==0.19.0",
    # IFEval's language instructions: the official checker detects languages with langdetect.
    "langdetect==1.0.9",
    # Models' own chat templates, rendered in its sandbox as transformers renders them
    # (itune.data.jinja_template); 3.1.6 is the first release without the known sandbox escapes.
    "jinja2==3.1.6",
    # Parquet files and Arrow datasets as data sources, read a record batch at a time
    # (itune.data.sources.parquet, .arrow); tensorflow-datasets already pulls it in, unpinned.
    "pyarrow==26.0.1",
]

EXTRAS_REQUIRE = {
    "test": [
        "pytest>=8",
        # The reference for model numerics. 2.13.0 resolves to the CPU build here; an unpinned
        # torch pulls a CUDA build of several GB.
        "torch==2.13.0",
        "transformers==5.23.0",
        # transformers refuses to load a GGUF model without it.
        "accelerate==1.15.0",
        # Writes the Arrow datasets (save_to_disk) that the Arrow source tests read.
        "datasets==5.2.0",
        # The notebooks (tests/test_notebooks.py): jupytext makes each .ipynb from its
        # percent-format .py, nbclient runs it on ipykernel's python3 kernel, and they plot with
        # matplotlib.
        "jupytext==1.19.6",
        "nbclient==0.11.0",
        "ipykernel==7.4.0",
        "matplotlib==3.11.2",
    ],
    # Ahead-of-time compilation for TPU slices, also from a CPU host.
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="itune",
    version="0.1.0",
    description="Instruction tuning of language models with JAX, Flax NNX and tf.data.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["itune", "itune.*"]),
    # Prompt sets shipped with the evaluation harness.
    package_data={"itune": ["evaluation/data/*.jsonl"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "itune-train=itune.cli.train:run",
            "itune-inspect=itune.cli.inspect:run",
            "itune-plan=itune.cli.plan:run",
            "itune-convert=itune.cli.convert:run",
            "itune-generate=itune.cli.generate:run",
            "itune-chat=itune.cli.chat:run",
            "itune-eval=itune.cli.eval:run",
            "itune-preflight=itune.cli.preflight:run",
        ],
    },
)

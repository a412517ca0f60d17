"""t5lite: a small, exactly resumable JAX training stack for T5-family models."""
from setuptools import find_packages, setup

setup(
    name='t5lite',
    version='0.1.0',
    description='Pretrain, fine-tune and evaluate T5-family models in JAX, from one CPU to a pod.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    # configs/ ships inside the package as t5lite.configs, so an installed t5lite (a Colab runtime,
    # a TPU VM) has its configs without a checkout: `from t5lite.configs import quickstart`.
    packages=find_packages(include=['t5lite', 't5lite.*']) + ['t5lite.configs'],
    package_dir={'t5lite.configs': 'configs'},
    python_requires='>=3.11',  # jax >= 0.7 needs 3.11
    install_requires=[
        'jax>=0.7.1',  # jax.set_mesh
        'flax>=0.10.0',  # linen logical partitioning
        'optax>=0.2.5',  # optax.tree.norm, tree_map_params
        'orbax-checkpoint>=0.11.0',
        'tensorflow-datasets>=4.9.6',
        'ml-collections>=0.1.1',
        'grain>=0.2.10',  # grain.MapDataset / IterDataset API
        'sentencepiece>=0.2.0',
        'absl-py>=1.4.0',
        'etils[epath]>=1.7.0',  # every path, local or gs:// (t5lite/files.py)
        'tensorboardX>=2.6',
        'numpy>=1.26',
        'pyarrow>=14',  # data.source=parquet:... (t5lite/data/table_sources.py)
    ],
    extras_require={
        # The suite runs the HuggingFace parity and metric tests too. torch itself is installed
        # first by the README's command (`pip install torch==2.13.0`): a bare `torch` requirement
        # here would pull the multi-GB CUDA build on machines without a CPU wheel at hand.
        'test': [
            'pytest>=8.0',
            'pytest-xdist>=3.5',
            'transformers>=4.40',
            'safetensors>=0.4',
            'peft>=0.17',  # LoRA adapter export loaded by peft (tests/test_lora.py)
            'datasets>=2.14',  # data.source=hf:DIR (tests/test_data_source.py)
            'sacrebleu>=2.4',
            'rouge-score>=0.1.2',
            'scipy>=1.10',
            # executing docs/notebooks/quickstart.ipynb headlessly
            'nbclient>=0.10',
            'nbformat>=5.9',
            'ipykernel>=6.29',
            'matplotlib>=3.8',
            # gs:// tests against a GCS API emulator on 127.0.0.1 (tests/conftest.py)
            'gcp-storage-emulator>=2024.8.3',
            'gcsfs>=2024.2.0',
            'google-cloud-storage>=2.14',
            # the tree's one formatter (pyproject.toml; tests/test_format.py)
            'yapf>=0.40',
            # ahead-of-time compiles for TPU topologies on the CPU host (tests/test_aot.py)
            'jax[tpu]',
        ],
        'tf': ['tensorflow>=2.16'],  # TFDS catalog builders, tfds mock data
        # HuggingFace interop; tokenizers reads data.vocabulary=hf:DIR's tokenizer.json
        # and datasets reads data.source=hf:DIR
        'hf': [
            'torch>=2.2', 'transformers>=4.40', 'safetensors>=0.4', 'tokenizers>=0.15',
            'datasets>=2.14'
        ],
        'metrics': ['sacrebleu>=2.4', 'rouge-score>=0.1.2', 'scipy>=1.10'],
        # gs:// paths: gcsfs under etils.epath; google-cloud-storage for TensorBoard event files
        'gcp': ['gcsfs>=2024.2.0', 'google-cloud-storage>=2.14'],
        'tensorboard': ['tensorboard>=2.16'],  # `tensorboard --logdir WORKDIR`
        # python -m t5lite.aot: XLA's TPU compiler, libtpu, at the version the installed jax pins
        # (the one a pod running this jax uses); no TPU needed to compile for one.
        'aot': ['jax[tpu]'],
    },
)

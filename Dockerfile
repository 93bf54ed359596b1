# The vlmlab image: Ray 2.60 (Python 3.11, CUDA) with this project and every dependency installed,
# so KubeRay pods, RayJobs and the RayService install nothing at run time.
#   make image                                          # docker build -t $(IMAGE) .
#   make image IMAGE=REGISTRY/vlmlab/vlmlab:0.1.0 && docker push REGISTRY/vlmlab/vlmlab:0.1.0
# k8s/*.yaml name the default tag of the Makefile's IMAGE (a placeholder registry): see README.md,
# "Running on Kubernetes", to use your own registry.
FROM rayproject/ray:2.60.0-py311-gpu

# PyTorch's CUDA 13.0 build of the pinned releases; its wheels bring their own CUDA libraries, so
# the nodes need only an NVIDIA driver that runs CUDA 13 (>= 580). The pins are pyproject.toml's.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# optional dependency groups baked in: the corpus builder's diffusion stage needs diffusers
ARG EXTRAS=diffusion

RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# RayJobs ship this directory as their working_dir (k8s/rayjob-*.yaml), so `--config training/...`
# paths resolve as they do in a checkout.
WORKDIR /home/ray/vlmlab

# Dependencies in a layer of their own, rebuilt only when pyproject.toml changes; the torch pins
# above already satisfy theirs, so nothing is fetched from PyPI in their place.
COPY --chown=ray:users pyproject.toml ./
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ['EXTRAS'].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=ray:users . .
# the project itself (its dependencies are all in the layer above); then a smoke test of the imports
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import open_clip, faiss, peft, ultralytics, deepspeed, diffusers, torch, ray; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert ray.__version__.startswith('2.60.'), ray.__version__"

# syntax=docker/dockerfile:1
# The amt-search image: the project on a CUDA PyTorch base, run as a non-root user.
#   docker build -t amt-search:local .
#   docker run --rm --gpus '"device=0"' -e AMT_STORAGE_URL=postgresql+psycopg2://... \
#       amt-search:local worker --study NAME --gpu 0
# The base's torch is kept: pip is constrained to the installed version and fails rather than
# download another one. Pick a base whose torch satisfies pyproject.toml (torch>=2.4).
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AMT_HOME=/var/lib/amt-search

WORKDIR /app

# Dependencies first (their own layer, rebuilt only when pyproject.toml changes).
COPY pyproject.toml README.md ./
RUN python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
        > /tmp/constraints.txt \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt

COPY trainer trainer
COPY search search
COPY storage storage
COPY configs configs
RUN pip install --no-deps . && amt-search --help > /dev/null

# Writable places, owned by the runtime user so that named volumes mounted there inherit it:
# /app/runs (checkpoints; train.out_dir is relative to /app) and $AMT_HOME/cache (tokenizers and
# tokenised shards). No VOLUME here: one-shot containers would leave anonymous volumes behind;
# docker-compose.yml and k8s/ mount named volumes instead.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin amt \
    && mkdir -p /app/runs "$AMT_HOME/cache" \
    && chown -R amt:amt /app/runs "$AMT_HOME"
USER amt

# Workers and one-shot jobs have nothing to probe; the dashboard's healthcheck is in
# docker-compose.yml (and a readiness probe in k8s/dashboard.yaml).
ENTRYPOINT ["amt-search"]
CMD ["--help"]

# The one application image: gateway (default), worker, migrate and replay differ only in their command.
#   docker build -t crm-ingest .
#   docker run crm-ingest                          # python -m gateway
#   docker run crm-ingest python -m worker         # or: python -m shared.migrate / python -m worker.replay list
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A real passwd entry (not just a numeric uid): the replay tool's default --actor comes from getpass.getuser().
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /src

# Dependencies first, read from pyproject.toml, so that code changes do not reinstall them.
# (Every dependency ships manylinux wheels for CPython 3.11: no compiler needed.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself, a regular (non-editable) install without the test extras. The source tree is
# removed afterwards so that `python -m ...` imports the installed package, migrations included.
COPY README.md ./
COPY shared/ shared/
COPY gateway/ gateway/
COPY worker/ worker/
COPY console/ console/
RUN pip install --no-deps . \
    && cd / && rm -rf /src

WORKDIR /app
USER 10001:10001

EXPOSE 3000
CMD ["python", "-m", "gateway"]

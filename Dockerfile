FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md schema.sql Procfile ./
COPY worker ./worker
# Editable: `python -m worker migrate` reads schema.sql from the source tree beside the package.
# The metrics directory exists in the image, owned by the worker user, so the shared volume mounted there is too.
RUN pip install -e . && useradd --system worker \
    && mkdir -p /var/run/worldspeak-metrics && chown worker /var/run/worldspeak-metrics
USER worker
EXPOSE 8000
ENV WEB_HOST=0.0.0.0
CMD ["python", "-m", "worker", "web"]

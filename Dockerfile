FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md schema.sql Procfile ./
COPY worker ./worker
# Editable: `python -m worker migrate` reads schema.sql from the source tree beside the package.
RUN pip install -e . && useradd --system worker
USER worker
EXPOSE 8000
ENV WEB_HOST=0.0.0.0
CMD ["python", "-m", "worker", "web"]

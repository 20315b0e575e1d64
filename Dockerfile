# The rolebus worker image used by docker-compose.yml (one service per role).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
COPY roles ./roles
ENTRYPOINT ["rolebus"]

# Sourced by the GPU scripts: install the carried wheels (.whl: torchao, rustbpe) where the GPU
# machine has no package registry, and keep Python's output unbuffered.
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

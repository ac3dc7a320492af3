# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all bench bench-quality bench-gpu performance clean

setup: $(STAMP)

# Pinned CPU torch goes in first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/logitcache run configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

# Speed and memory: each script prints one JSON line of figures measured side by side and keeps it, stamped,
# in bench/results/; docs/performance.md is rendered from there. Two whole runs on an idle 2-core machine:
# 20.1 and 18.0 min (the first: scale 7.8, kd_overhead 2.9, fanout 2.3, reader 1.4, heap 1.3, threads 1.0,
# student_memory 0.9, object_storage 0.9, student_streaming 0.7, amortization 0.6, teacher_overhead 0.4;
# fanout's machine check was shortened between them); gloo_exit, added since, 3.6 min.
# bench/heap.py without --settings also pins at 1 and 4 MB.
bench: $(STAMP)
	$(PY) bench/teacher_overhead.py
	$(PY) bench/kd_overhead.py
	$(PY) bench/student_streaming.py
	$(PY) bench/student_memory.py
	$(PY) bench/reader.py --repeats 5
	$(PY) bench/object_storage.py
	$(PY) bench/amortization.py
	$(PY) bench/fanout.py
	$(PY) bench/threads.py
	$(PY) bench/heap.py --settings pinned_8mb,pinned_16mb,glibc_adjusting
	$(PY) bench/scale.py --tokenize-words 83000
	$(PY) bench/gloo_exit.py --runs 40
	$(PY) bench/render.py

# What students learn from each encoding and layout at equal bytes, against references (about 37 minutes
# on 2 cores before cross_tokenizer, which adds a teacher, a cache and 18 student jobs: not yet timed from
# scratch on an idle machine); results and page as for bench.
bench-quality: $(STAMP)
	$(PY) bench/bytes.py
	$(PY) bench/kd_gain.py
	$(PY) bench/views.py
	$(PY) bench/lm_students.py
	$(PY) bench/cross_tokenizer.py
	$(PY) bench/temperature.py
	$(PY) bench/grow.py
	$(PY) bench/grow.py --students
	$(PY) bench/render.py

# The GPU path's figures, on a machine with a CUDA device (under 5 minutes on one H100); results and page as
# for bench. Without one, `bench/gpu.py --toy` runs the same code on the CPU at toy sizes (the tests do).
bench-gpu: $(STAMP)
	$(PY) bench/gpu.py
	$(PY) bench/render.py

# docs/performance.md from bench/results/*.json (generated: edit bench/render.py, not the page).
performance: $(STAMP)
	$(PY) bench/render.py

clean:
	rm -rf data/caches data/runs data/teachers data/tokens

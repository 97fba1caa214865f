# Convenience targets; each is a thin wrapper over a script that documents itself.
.PHONY: setup test quickstart bench docker
setup:        ; bash scripts/setup.sh
test:         ; bash scripts/test.sh
quickstart:   ; bash scripts/quickstart.sh
bench:        ; bash bench/run_all.sh
docker:       ; docker build -t sharded-optim .

# fw_tier: PGXS build.  `make && make install`; `make fwsim` builds the simulator.
MODULE_big = fw_tier
OBJS = \
	src/fw_tier.o \
	src/shmem.o \
	src/escalation.o \
	src/calllog.o \
	src/spill.o \
	src/launcher.o \
	src/flusher.o \
	src/winsync.o \
	src/loginsert.o \
	src/prices.o \
	src/status.o \
	src/http.o \
	src/workloads.o \
	src/fixtures.o \
	src/budget.o \
	src/progress.o \
	src/spend.o \
	src/fwjson.o \
	src/jsonschema.o \
	src/engine.o \
	src/embed.o \
	src/enrich.o \
	src/sqlfuncs.o \
	src/origin.o \
	src/shipper.o

EXTENSION = fw_tier
DATA = $(wildcard sql/fw_tier--*.sql)
PGFILEDESC = "fw_tier - Fireworks AI calls from SQL with tier routing"

PG_CPPFLAGS = -I$(srcdir)/src -I$(libpq_srcdir) $(shell curl-config --cflags)
# libpq: a standby ships its call log to the primary (src/shipper.c), as
# dblink and postgres_fdw link it
SHLIB_LINK_INTERNAL = $(libpq)
SHLIB_LINK = $(shell curl-config --libs)

# Regression suite: run against the simulator by test/run-regress.sh, which
# writes test/regress.conf and exports FWSIM_URL.
REGRESS = install complete chat routing failures cancel secrets privileges escalation calllog batch replay json embed rerank enrich
REGRESS_OPTS = --temp-config=$(srcdir)/test/regress.conf --temp-instance=$(srcdir)/tmp_check

# TAP tests (t/*.pl) are run by test/run-tap.sh with prove.

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

.PHONY: fwsim
fwsim:
	$(MAKE) -C test/fwsim

# PGXS tracks no header dependencies: rebuild everything when one changes.
$(OBJS): $(wildcard src/*.h)

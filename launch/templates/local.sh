#!/bin/bash
# Rendered by `python -m launch cluster=local` ({{ job.name }}); run it again to resume the run.
#
# torchrun starts {{ job.ranks_per_node }} rank(s) on this machine. When a rank dies, torchrun stops the
# others and starts the group again, at most {{ max_restarts }} time(s); every start resumes from the
# newest committed checkpoint (checkpoint.resume=last) and continues the same MLflow run (its id is
# in the checkpoint).
set -euo pipefail
cd {{ workdir | q }}
{% for name, value in env.items() %}
export {{ name }}={{ value | q }}
{% endfor %}
exec {{ python | q }} -m torch.distributed.run --standalone --nproc_per_node={{ job.ranks_per_node }} \
    --max-restarts={{ max_restarts }} \
    {{ trainer_args }}

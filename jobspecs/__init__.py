"""The VM's Nomad job: typed variables, the one template (``render_job``), its HCL form, name helpers.

    templates = load_catalog(DEFAULT_CATALOG, settings.images_dir)
    vm = VMSpec.for_template(templates["tiny"], id=vm_id, owner=user_id, overlay_path=overlay)
    job = render_job(vm, templates["tiny"], JobSettings.from_settings(settings))  # POST {"Job": job}
    print(to_hcl(job))                                                            # same job, as HCL

``python -m jobspecs`` renders every template of the catalog (CI's check) or prints one job.
"""

from jobspecs.catalog import DEFAULT_CATALOG, CatalogError, Limits, Sizes, Template, WarmImage, load_catalog
from jobspecs.hcl import hcl_duration, hcl_string, to_hcl
from jobspecs.render import (
    CPU_MHZ_PER_VCPU,
    GROUP_NAME,
    TASK_NAME,
    JobSettings,
    JobSpecError,
    VMSpec,
    job_name,
    render_job,
    variables,
    vm_id_of,
    warm_fits,
)
from jobspecs.starts import cold_job, is_warm, loadvm_job, resume_job, with_network

__all__ = [
    "CPU_MHZ_PER_VCPU",
    "DEFAULT_CATALOG",
    "GROUP_NAME",
    "TASK_NAME",
    "CatalogError",
    "JobSettings",
    "JobSpecError",
    "Limits",
    "Sizes",
    "Template",
    "VMSpec",
    "WarmImage",
    "cold_job",
    "hcl_duration",
    "hcl_string",
    "is_warm",
    "job_name",
    "load_catalog",
    "loadvm_job",
    "render_job",
    "resume_job",
    "to_hcl",
    "variables",
    "vm_id_of",
    "warm_fits",
    "with_network",
]

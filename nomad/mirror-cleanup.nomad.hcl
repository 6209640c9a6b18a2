# Undoes what the mirror job's prestart task did, once on every client (a sysbatch job): puts
# back the hosts.toml files or daemon.json that `mirror configure` replaced.
#
#   nomad job stop -purge mirror
#   nomad job run -var image=registry.example.com/mirror:0.1.0 nomad/mirror-cleanup.nomad.hcl
#   nomad job stop -purge mirror-cleanup     # when every allocation has completed
#
# Give it the same runtime variable as the mirror job.

variable "image" {
  type        = string
  description = "The mirror image (the same as the mirror job's)."
}

variable "datacenters" {
  type        = list(string)
  description = "Datacenters the mirror job ran in."
  default     = ["*"]
}

variable "runtime" {
  type        = string
  description = "docker or containerd, as given to the mirror job."
  default     = "docker"

  validation {
    condition     = contains(["docker", "containerd"], var.runtime)
    error_message = "The runtime must be docker or containerd."
  }
}

locals {
  runtime_config_dir = var.runtime == "docker" ? "/etc/docker" : "/etc/containerd/certs.d"
  runtime_config_arg = var.runtime == "docker" ? "--daemon-json=/etc/docker/daemon.json" : "--config-path=/etc/containerd/certs.d"
}

job "mirror-cleanup" {
  type        = "sysbatch"
  datacenters = var.datacenters

  group "cleanup" {
    restart {
      attempts = 2
      delay    = "10s"
      mode     = "fail"
    }

    task "cleanup-runtime" {
      driver = "docker"
      user   = "root"

      config {
        image        = var.image
        network_mode = "host"
        # Puts back the originals `mirror configure` recorded next to the files it wrote.
        args    = ["cleanup", var.runtime, local.runtime_config_arg]
        volumes = ["${local.runtime_config_dir}:${local.runtime_config_dir}"]
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }
  }
}

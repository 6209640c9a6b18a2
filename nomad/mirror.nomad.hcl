# mirror on Nomad: one node agent on every client (a system job), serving image pulls from what
# the cluster already holds. See nomad/README.md for the client configuration it needs and how
# to point Docker and containerd at it.
#
#   nomad var put nomad/jobs/mirror cluster_key="$(mirror keygen)"   # once
#   nomad job run -var image=registry.example.com/mirror:0.1.0 nomad/mirror.nomad.hcl
#
# Images every client keeps before they are needed: -var prefetch_file=..., prefetch_from_jobs,
# node_label_meta (nomad/README.md, "Images ahead of need").

variable "image" {
  type        = string
  description = "The mirror image, built with the repository's Dockerfile, in a registry the clients pull from without the mirror."
}

variable "datacenters" {
  type        = list(string)
  description = "Datacenters to run a node agent in."
  default     = ["*"]
}

variable "runtime" {
  type        = string
  description = "What the clients' workloads pull with: docker (the docker task driver) or containerd (the containerd task driver)."
  default     = "docker"

  validation {
    condition     = contains(["docker", "containerd"], var.runtime)
    error_message = "The runtime must be docker or containerd."
  }
}

variable "containerd_content_path" {
  type        = string
  description = "containerd's content store directory on the clients."
  default     = "/var/lib/containerd/io.containerd.content.v1.content"
}

variable "prefetch_file" {
  type        = string
  description = "The prefetch file's contents: TOML [[image]] entries (ref, source, nodes; docs/prefetch.md) of images every client keeps in its runtime before they are needed. Empty: no file."
  default     = ""
}

variable "prefetch_from_jobs" {
  type        = bool
  description = "Also keep the images of every job that can place on the client (--prefetch-from nomad). The job's workload identity then needs list-jobs and read-job: see nomad/README.md."
  default     = false
}

variable "node_label_meta" {
  type        = list(string)
  description = "Client meta keys that become the agent's node labels (the key, with the client's meta value), which the nodes table of a prefetch file entry matches."
  default     = []
}

locals {
  # Docker keeps its containerd images in namespace moby; the containerd task driver in nomad.
  containerd_namespace = var.runtime == "docker" ? "moby" : "nomad"

  # Where `mirror configure` writes: dockerd's daemon.json (registry-mirrors), or containerd's
  # hosts.toml directory (config_path).
  runtime_config_dir = var.runtime == "docker" ? "/etc/docker" : "/etc/containerd/certs.d"
  runtime_config_arg = var.runtime == "docker" ? "--daemon-json=/etc/docker/daemon.json" : "--config-path=/etc/containerd/certs.d"

  # Read-only: containerd's socket directory (a mount of the socket file itself would go stale
  # when containerd restarts) and its content store, at the same paths, plus Docker's socket.
  runtime_mounts = concat(
    [
      "/run/containerd:/run/containerd:ro",
      "${var.containerd_content_path}:${var.containerd_content_path}:ro",
    ],
    var.runtime == "docker" ? ["/run/docker.sock:/run/docker.sock:ro"] : [],
  )

  # The agent's node labels, "KEY=${meta.KEY} ..." for every key of var.node_label_meta: $${ is a
  # literal ${, so the client fills in its own meta value when the task starts.
  node_labels = join(" ", [for key in var.node_label_meta : "${key}=$${meta.${key}}"])
}

job "mirror" {
  type        = "system"
  datacenters = var.datacenters
  priority    = 80

  # One client at a time, so most of the cluster keeps serving during an update.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "mirror" {
    # Host networking: the agent binds the client's own ports. Nomad only books the port
    # numbers (a port label has no protocol: the static ports are reserved for TCP and UDP
    # alike) and maps nothing, so the DHT router's UDP port works like any socket on the host.
    network {
      mode = "host"

      port "registry" {
        static = 5000
      }

      port "router" {
        static = 5001
      }

      port "metrics" {
        static = 9090
      }
    }

    # Registered with Nomad's own service catalog: the agents find each other through it
    # (--bootstrap nomad:mirror), and Nomad checks /readyz and /healthz.
    service {
      provider = "nomad"
      name     = "mirror"
      port     = "registry"

      check {
        name     = "readyz"
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"
      }

      check {
        name     = "healthz"
        type     = "http"
        path     = "/healthz"
        interval = "20s"
        timeout  = "5s"

        check_restart {
          limit = 3
          grace = "30s"
        }
      }
    }

    # Points the runtime at this node's mirror before the agent starts. Cleanup is a separate
    # sysbatch job (nomad/mirror-cleanup.nomad.hcl), not a poststop task: a poststop task of an
    # allocation being replaced could run after its replacement's prestart and undo it.
    task "configure-runtime" {
      driver = "docker"
      user   = "root"

      lifecycle {
        hook    = "prestart"
        sidecar = false
      }

      config {
        image        = var.image
        network_mode = "host"
        args = [
          "configure",
          var.runtime,
          local.runtime_config_arg,
          "--mirror=http://127.0.0.1:${NOMAD_PORT_registry}",
        ]
        # Docker's socket too: `configure docker` asks the daemon whether it reads
        # certs.d/<registry>/hosts.toml (Docker 28+ on the containerd image store).
        volumes = concat(
          ["${local.runtime_config_dir}:${local.runtime_config_dir}"],
          var.runtime == "docker" ? ["/run/docker.sock:/run/docker.sock:ro"] : [],
        )
      }

      resources {
        cpu    = 50
        memory = 64
      }
    }

    task "mirror" {
      driver       = "docker"
      user         = "root"
      kill_timeout = "20s"

      config {
        image           = var.image
        network_mode    = "host"
        args            = ["run"]
        readonly_rootfs = true
        cap_drop        = ["all"]
        volumes = concat(local.runtime_mounts, [
          "/var/lib/mirror:/var/lib/mirror",
        ])

        mount {
          type     = "tmpfs"
          target   = "/tmp"
          readonly = false

          tmpfs_options {
            size = 67108864
          }
        }
      }

      # NOMAD_TOKEN: the workload identity, allowed to read this namespace's service
      # registrations, for the nomad: bootstrap through the Task API socket.
      identity {
        env = true
      }

      # The cluster key from the job's Nomad variable; the file lives in the task's secrets dir.
      template {
        data        = <<-EOT
          {{- with nomadVar "nomad/jobs/mirror" }}{{ .cluster_key }}{{ end }}
        EOT
        destination = "secrets/cluster.key"
        perms       = "400"
        change_mode = "restart"
      }

      # The prefetch file (var.prefetch_file), only when there is one. noop: the agent polls
      # the file, so content that changes at run time (a nomadVar in it) needs no restart.
      dynamic "template" {
        for_each = var.prefetch_file == "" ? [] : [var.prefetch_file]

        content {
          data        = template.value
          destination = "local/prefetch.toml"
          change_mode = "noop"
        }
      }

      # MIRROR_PREFETCH_FILE, also only when there is a file: the env block below is one plain
      # map with no key that comes and goes, so this variable comes from an env template. The
      # Docker driver mounts the task directory (NOMAD_TASK_DIR) at /local.
      dynamic "template" {
        for_each = var.prefetch_file == "" ? [] : ["MIRROR_PREFETCH_FILE=/local/prefetch.toml"]

        content {
          data        = template.value
          destination = "local/prefetch.env"
          env         = true
          change_mode = "noop"
        }
      }

      env {
        MIRROR_STORE                   = var.runtime
        MIRROR_DOCKER_HOST             = "unix:///run/docker.sock"
        MIRROR_CONTAINERD_SOCK         = "/run/containerd/containerd.sock"
        MIRROR_CONTAINERD_NAMESPACE    = local.containerd_namespace
        MIRROR_CONTAINERD_CONTENT_PATH = var.containerd_content_path
        MIRROR_CACHE_DIR               = "/var/lib/mirror"
        MIRROR_CACHE_SIZE              = "20%"
        MIRROR_REGISTRY_ADDR           = "0.0.0.0:${NOMAD_PORT_registry}"
        MIRROR_ROUTER_ADDR             = "0.0.0.0:${NOMAD_PORT_router}"
        MIRROR_METRICS_ADDR            = "0.0.0.0:${NOMAD_PORT_metrics}"
        MIRROR_ADVERTISE_ADDR          = "${NOMAD_IP_registry}"
        MIRROR_CLUSTER_KEY_FILE        = "${NOMAD_SECRETS_DIR}/cluster.key"
        MIRROR_BOOTSTRAP               = "nomad:mirror:${NOMAD_PORT_router}"
        MIRROR_LOG_LEVEL               = "info"
        # Prefetch (docs/prefetch.md): the images of the jobs that can place here, with
        # var.prefetch_from_jobs (empty: none), for the client's node pool (its datacenter comes
        # from NOMAD_DC, which Nomad sets), and the labels from client meta (empty: none).
        MIRROR_PREFETCH_FROM   = var.prefetch_from_jobs ? "nomad" : ""
        MIRROR_NOMAD_NODE_POOL = "${node.pool}"
        MIRROR_NODE_LABEL      = local.node_labels
        # The local agent's Task API: no TLS or agent address to know, the token above works.
        NOMAD_ADDR = "unix://${NOMAD_SECRETS_DIR}/api.sock"
      }

      resources {
        cpu        = 200
        memory     = 256
        memory_max = 512
      }
    }
  }
}

#!/bin/bash
# Entrypoint of the core image (docker/core.Dockerfile).
#
# Spark on Kubernetes (the Spark Operator's SparkApplication) starts its driver and executor pods
# from this image without a command, only with the arguments `driver ...` or `executor`, and
# expects the image's entrypoint to turn them into spark-submit (driver, client mode inside its pod)
# or the executor backend's JVM. Anything else (the predictor's default CMD, KFP's and the
# manifests' commands) runs unchanged.
#
# SPARK_HOME is the Spark distribution inside the pyspark package of the image's environment
# (jars/ and bin/); JAVA_HOME the image's Java runtime. Nothing is written: the root filesystem is
# read-only.
set -euo pipefail

spark_classpath() {
  local classpath="${SPARK_CLASSPATH:-}:${SPARK_HOME}/jars/*"
  if [ -n "${SPARK_EXTRA_CLASSPATH:-}" ]; then
    classpath="${classpath}:${SPARK_EXTRA_CLASSPATH}"
  fi
  if [ -n "${HADOOP_CONF_DIR:-}" ]; then
    classpath="${HADOOP_CONF_DIR}:${classpath}"
  fi
  # the driver's configuration volume (Spark mounts it and sets SPARK_CONF_DIR), else SPARK_HOME's
  classpath="${SPARK_CONF_DIR:-${SPARK_HOME}/conf}:${classpath}"
  printf '%s' "${classpath}"
}

case "${1:-}" in
  driver)
    shift
    exec "${SPARK_HOME}/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
      --deploy-mode client \
      "$@"
    ;;
  executor)
    shift
    # the executor's JVM options arrive as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... in that order
    java_opts=()
    while IFS= read -r index; do
      name="SPARK_JAVA_OPT_${index}"
      java_opts+=("${!name}")
    done < <(compgen -e | sed -n 's/^SPARK_JAVA_OPT_\([0-9][0-9]*\)$/\1/p' | sort -n)
    exec "${JAVA_HOME}/bin/java" \
      "${java_opts[@]}" \
      "-Xms${SPARK_EXECUTOR_MEMORY}" \
      "-Xmx${SPARK_EXECUTOR_MEMORY}" \
      -cp "$(spark_classpath)" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL}" \
      --executor-id "${SPARK_EXECUTOR_ID}" \
      --cores "${SPARK_EXECUTOR_CORES}" \
      --app-id "${SPARK_APPLICATION_ID}" \
      --hostname "${SPARK_EXECUTOR_POD_IP}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID}" \
      --podName "${SPARK_EXECUTOR_POD_NAME}"
    ;;
  *)
    exec "$@"
    ;;
esac

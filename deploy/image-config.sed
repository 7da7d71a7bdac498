# The image's /etc/llm-gateway/gateway.yaml: config/gateway.yaml listening on every
# interface of the container, with the model file the image holds (deploy/Dockerfile).
# Set in the file, not as LLM_GATEWAY__... variables of the image: a pod's own
# LLM_GATEWAY__SERVER='{...}' or LLM_GATEWAY__LOCAL_MODEL='{...}' would then be a second
# variable for one key, a config error, where it is meant to replace the section.
s|^  listen: 127\.0\.0\.1:50051 .*$|  listen: 0.0.0.0:50051          # every interface of the container|
/^local_model:$/a\
  model_path: /opt/llm-gateway/models/gemma3-270m-q4_k_m.gguf

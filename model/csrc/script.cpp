// The few TorchScript calls tch does not expose: a module's buffers (batch
// norm statistics must be exchanged with its parameters), and forward/train
// with errors returned as text instead of thrown across the FFI boundary.
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

typedef torch::jit::script::Module *mt_module;
typedef at::Tensor *mt_tensor;

static char *mt_dup(const char *s) {
  size_t n = std::strlen(s) + 1;
  char *out = static_cast<char *>(std::malloc(n));
  if (out) std::memcpy(out, s, n);
  return out;
}

// c10 errors carry a C++ backtrace after the message; users need the message.
#define MT_CATCH(err)                                  \
  catch (const c10::Error &e) {                        \
    *(err) = mt_dup(e.what_without_backtrace());       \
  }                                                    \
  catch (const std::exception &e) {                    \
    *(err) = mt_dup(e.what());                         \
  }                                                    \
  catch (...) {                                        \
    *(err) = mt_dup("unknown C++ exception");          \
  }

extern "C" {

void mt_free_str(char *s) { std::free(s); }

mt_module mt_script_load(const char *path, int cuda_index, char **err) {
  try {
    c10::Device device = cuda_index < 0 ? c10::Device(c10::kCPU)
                                        : c10::Device(c10::kCUDA, cuda_index);
    auto m = torch::jit::load(std::string(path), device);
    return new torch::jit::script::Module(std::move(m));
  }
  MT_CATCH(err)
  return nullptr;
}

void mt_script_free(mt_module m) { delete m; }

int mt_script_train(mt_module m, int on, char **err) {
  try {
    m->train(on != 0);
    return 0;
  }
  MT_CATCH(err)
  return -1;
}

mt_tensor mt_script_forward(mt_module m, mt_tensor x, char **err) {
  try {
    std::vector<torch::jit::IValue> inputs{*x};
    auto out = m->forward(inputs);
    if (!out.isTensor()) {
      std::string what = "forward returned " + std::string(out.tagKind()) +
                         ", not one tensor";
      *err = mt_dup(what.c_str());
      return nullptr;
    }
    return new at::Tensor(out.toTensor());
  }
  MT_CATCH(err)
  return nullptr;
}

// Every parameter, then every buffer, as handles that share storage with the
// module (writing into them changes the module).
int mt_script_state(mt_module m, void *data,
                    void (*f)(void *, const char *, mt_tensor, int),
                    char **err) {
  try {
    for (const auto &p : m->named_parameters(true))
      f(data, p.name.c_str(), new at::Tensor(p.value), 0);
    for (const auto &b : m->named_buffers(true))
      f(data, b.name.c_str(), new at::Tensor(b.value), 1);
    return 0;
  }
  MT_CATCH(err)
  return -1;
}

}  // extern "C"

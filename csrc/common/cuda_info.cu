// Runtime queries of the CUDA library: error strings and device presence, so Python can say
// why the cuda backend is unavailable without importing a CUDA build of torch.
#include <cuda_runtime.h>

#include "common/txfm_common.h"

TXFM_API int txfm_cuda_abi_version() { return 1; }

TXFM_API const char* txfm_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

// Returns a cudaError_t; *count is 0 when no driver or device is present.
TXFM_API int txfm_cuda_device_count(int* count) {
  *count = 0;
  cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky error so later calls report their own
  }
  return static_cast<int>(err);
}

TXFM_API int txfm_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

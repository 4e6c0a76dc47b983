/* CUDA symbol stubs for PyPI's torchvision 0.28.0 on a CPU-only torch (torch 2.13.0+cpu).
 *
 * PyPI's torchvision wheel is a CUDA build: its _C.so and image.so need libc10_cuda.so /
 * libtorch_cuda.so, which a CPU torch does not ship, so `import torchvision` fails with
 * "operator torchvision::nms does not exist" (and transformers, hence vLLM, with it).
 * The two libraries import only the symbols below, and call none of them for CPU tensors.
 * scripts/install_vllm_cpu.sh compiles this file into torchvision.libs/libc10_cuda.so next to
 * an empty libtorch_cuda.so. Every stub aborts loudly if it is ever reached; device_count()
 * reports no devices. See shared/notes/vllm-cpu.md section 1.
 *
 * The names are the Itanium-mangled C++ symbols that `nm -D --undefined-only` lists for
 * torchvision/_C.so and torchvision/image.so; the install script re-checks that list.
 */
#include <stdio.h>
#include <stdlib.h>

static void cuda_stub_called(const char *name) {
    fprintf(stderr, "chatvla: torchvision CUDA stub called on a CPU-only install: %s\n", name);
    abort();
}

#define CUDA_STUB(sym) void sym(void) { cuda_stub_called(#sym); }

/* at::cuda::getCurrentDeviceProperties() */
CUDA_STUB(_ZN2at4cuda26getCurrentDevicePropertiesEv)
/* c10::cuda device management */
CUDA_STUB(_ZN3c104cuda14ExchangeDeviceEa)
CUDA_STUB(_ZN3c104cuda14MaybeSetDeviceEa)
CUDA_STUB(_ZN3c104cuda14current_deviceEv)
CUDA_STUB(_ZN3c104cuda9GetDeviceEPa)
CUDA_STUB(_ZN3c104cuda9SetDeviceEab)
CUDA_STUB(_ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_jb)
/* c10::cuda streams */
CUDA_STUB(_ZN3c104cuda17getStreamFromPoolEba)
CUDA_STUB(_ZN3c104cuda17getStreamFromPoolEia)
CUDA_STUB(_ZN3c104cuda20getCurrentCUDAStreamEa)
CUDA_STUB(_ZN3c104cuda20getDefaultCUDAStreamEa)
CUDA_STUB(_ZN3c104cuda20setCurrentCUDAStreamENS0_10CUDAStreamE)
CUDA_STUB(_ZNK3c104cuda10CUDAStream11synchronizeEv)
CUDA_STUB(_ZNK3c104cuda10CUDAStream5queryEv)
CUDA_STUB(_ZNK3c104cuda10CUDAStream6streamEv)

/* c10::cuda::device_count(): no CUDA devices here. */
int _ZN3c104cuda12device_countEv(void) { return 0; }

/* c10::cuda::CUDACachingAllocator::allocator (a global pointer); never dereferenced on CPU. */
void *_ZN3c104cuda20CUDACachingAllocator9allocatorE = 0;

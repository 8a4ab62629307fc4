// The CPU kernel entry points. Each (op, rank, element type) is instantiated in its own
// generated file and reached through the generated dispatch table (autogen/).
#pragma once

#include "common/na_params.h"
#include "cpu/fna_kernel_common.h"
#include "cpu/host_services.h"

namespace natten::cpu {

template <int Rank, typename T>
void fna_forward(NaProblem const&, FnaTensors const&, CpuTileConfig const&, HostServices const&);
template <int Rank, typename T>
void fna_backward(NaProblem const&, FnaTensors const&, CpuTileConfig const&, HostServices const&);
template <int Rank, typename T>
void na_qk_forward(NaProblem const&, NaUnfusedTensors const&, HostServices const&);
template <int Rank, typename T>
void na_qk_backward(NaProblem const&, NaUnfusedTensors const&, HostServices const&);
template <int Rank, typename T>
void na_av_forward(NaProblem const&, NaUnfusedTensors const&, HostServices const&);
template <int Rank, typename T>
void na_av_backward(NaProblem const&, NaUnfusedTensors const&, HostServices const&);

}  // namespace natten::cpu

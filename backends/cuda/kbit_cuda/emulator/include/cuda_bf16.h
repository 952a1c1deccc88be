// Empty on purpose: under the kbit CUDA emulator, cuda_emu.h defines what this header would.
#pragma once

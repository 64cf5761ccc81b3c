// What the kernels share about the AMX tile unit: whether this build and this process may use it,
// and the one tile layout they all use.
#pragma once

#include <cstdint>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define EVENTCODER_AMX 1
#endif

namespace eventcoder_amx {

#ifdef EVENTCODER_AMX
// Linux hands out the tile registers' state only to processes that ask (oneDNN asks too; asking
// twice is harmless).
inline bool permitted() {
  static const bool granted = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Every tile used by the kernels is 16 rows of 64 bytes: 16 fp32 or 32 bf16 per row. Set per
// thread, before its first tile instruction.
inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}
#else
inline bool permitted() { return false; }
#endif

}  // namespace eventcoder_amx

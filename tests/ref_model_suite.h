#pragma once
// A test suite over the bundled reference model on the CPU, loaded once per suite: the backend, the model and its
// tokenizer (engine and server tests share it).
#include <memory>

#include <gtest/gtest.h>

#include "backend/cpu/cpu_backend.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace spear::test {

class RefModelSuite : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    be_ = new CpuBackend();
    model_ = Model::load(ref_model_dir(), *be_).release();
    tok_ = new Tokenizer(Tokenizer::from_dir(ref_model_dir()));
  }
  static void TearDownTestSuite() {
    delete model_;
    delete be_;
    delete tok_;
    model_ = nullptr, be_ = nullptr, tok_ = nullptr;
  }
  static inline CpuBackend* be_ = nullptr;
  static inline Model* model_ = nullptr;
  static inline Tokenizer* tok_ = nullptr;
};

}  // namespace spear::test

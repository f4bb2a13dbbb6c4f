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
    be_ = std::make_unique<CpuBackend>();
    model_ = Model::load(ref_model_dir(), *be_);
    tok_ = std::make_unique<Tokenizer>(Tokenizer::from_dir(ref_model_dir()));
  }
  static void TearDownTestSuite() {  // the model before the backend it was loaded on
    model_.reset();
    be_.reset();
    tok_.reset();
  }
  static inline std::unique_ptr<CpuBackend> be_;
  static inline std::unique_ptr<Model> model_;
  static inline std::unique_ptr<Tokenizer> tok_;
};

}  // namespace spear::test
